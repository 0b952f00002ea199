"""Activation ranges (calib.ranges) and comparison (calib.compare) on small hand-built graphs
whose values are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto as T  # noqa: E402
from onnx import helper  # noqa: E402

from calib.compare import Report, compare_graphs, emulate_fp16, psnr  # noqa: E402
from calib.ranges import chunk_names, collect_ranges, layer_scope, node_scope, scope_matches  # noqa: E402


def _scoped(node, scopes):
    p = node.metadata_props.add()
    p.key = "pkg.torch.onnx.name_scopes"
    p.value = repr(scopes)
    return node


def _square_graph(dtype=T.FLOAT):
    """y = sqrt(x*x) + 1, with a Cast pair around the square for dtype FLOAT16 (an FP16 island)."""
    nodes = []
    x = "x"
    if dtype == T.FLOAT16:
        nodes.append(helper.make_node("Cast", ["x"], ["x16"], to=T.FLOAT16, name="cast_in"))
        x = "x16"
    nodes += [
        _scoped(helper.make_node("Mul", [x, x], ["sq"], name="node_mul"), ["", "decoder", "decoder.convs.3", "decoder.convs.3.conv", "mul"]),
        _scoped(helper.make_node("Sqrt", ["sq"], ["r"], name="node_sqrt"), ["", "decoder", "decoder.convs.3", "sqrt"]),
    ]
    r = "r"
    if dtype == T.FLOAT16:
        nodes.append(helper.make_node("Cast", ["r"], ["r32"], to=T.FLOAT, name="cast_out"))
        r = "r32"
    nodes.append(_scoped(helper.make_node("Add", [r, "one"], ["y"], name="node_add"), ["", "add"]))
    vi = [helper.make_tensor_value_info(n, dtype, [1, 4]) for n in ("sq", "r")] if dtype == T.FLOAT16 else []
    if dtype == T.FLOAT16:
        vi.append(helper.make_tensor_value_info("x16", T.FLOAT16, [1, 4]))
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4])], [helper.make_tensor_value_info("y", T.FLOAT, [1, 4])],
        initializer=[helper.make_tensor("one", T.FLOAT, [1], [1.0])], value_info=vi,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_scopes_from_exporter_metadata():
    m = _square_graph()
    scopes = {n.name: node_scope(n) for n in m.graph.node}
    assert scopes == {"node_mul": "decoder.convs.3.conv", "node_sqrt": "decoder.convs.3", "node_add": ""}
    assert layer_scope("decoder.convs.3.conv.modulation") == "decoder.convs.3"
    assert layer_scope("decoder.conv1.conv") == "decoder.conv1"
    assert layer_scope("encoder.fusion.0.att") == "encoder.fusion.0"
    assert scope_matches("decoder.convs.1.conv", "decoder.convs.1")
    assert not scope_matches("decoder.convs.10", "decoder.convs.1")


def test_ranges_exact_values_and_nan_inf_counts():
    m = _square_graph()
    feeds = [{"x": np.array([[1, -2, 3, 0.5]], np.float32)}, {"x": np.array([[300, 0, np.nan, 1]], np.float32)}]
    r = collect_ranges(m, feeds)
    sq, y = r.tensors["sq"], r.tensors["y"]
    assert sq.absmax == 90000.0 and sq.nan == 1 and sq.samples == 2
    assert sq.op == "Mul" and sq.producer == "node_mul" and sq.scope == "decoder.convs.3.conv"
    assert y.absmax == 301.0
    assert sq.overflows(1.0) and r.tensors["r"].overflows(4.0)  # 9e4 > 65504; r has a NaN in FP32
    first = collect_ranges(m, feeds[:1]).tensors["sq"]
    assert first.absmax == 9.0 and not first.overflows(16.0) and first.overflows(65504 / 9)
    assert r.tensors["one"].initializer and r.tensors["one"].absmax == 1.0
    assert r.by_scope()["decoder.convs.3"] == 90000.0


def test_ranges_chunked_under_a_memory_bound_match_one_pass():
    m = _square_graph()
    feeds = [{"x": np.arange(4, dtype=np.float32)[None] - 1.5}]
    one = collect_ranges(m, feeds)
    tiny = collect_ranges(m, feeds, max_bytes=16)  # one tensor per pass
    for k, v in one.tensors.items():
        assert tiny.tensors[k].absmax == v.absmax and tiny.tensors[k].percentiles == v.percentiles
    assert chunk_names({"a": 10, "b": 10, "c": 10}, 20) == [["a", "b"], ["c"]]


def test_psnr_definition():
    ref = np.linspace(-1, 1, 1000, dtype=np.float32)
    assert psnr(ref, ref) == math.inf
    noisy = ref + 0.01
    assert psnr(ref, noisy) == pytest.approx(10 * math.log10(4 / 1e-4), rel=1e-4)  # peak = data range 2
    bad = ref.copy()
    bad[3] = np.inf
    assert psnr(ref, bad) == -math.inf


def test_emulation_overflows_where_onnxruntime_cpu_does_not():
    """ONNX Runtime CPU runs FP16 ops in FP32 without rounding in between: x*x with x = 1000 then
    sqrt gives 1000. With FP16 storage the square (1e6) is inf. The emulation must show that."""
    import onnxruntime as ort

    m16 = _square_graph(T.FLOAT16)
    x = np.array([[1000, 3, 1.0001, 0.1]], np.float32)
    plain = ort.InferenceSession(m16.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.isfinite(plain).all()  # what plain ONNX Runtime CPU reports
    emu = emulate_fp16(m16)
    y = ort.InferenceSession(emu.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.isinf(y[0, 0])
    assert y[0, 1] == 4.0
    assert y[0, 2] == 2.0  # 1.0001 rounds to 1 in FP16
    x16 = np.float32(np.float16(0.1))
    r16 = np.float16(np.sqrt(np.float32(np.float16(x16 * x16))))  # FP32 compute, FP16 storage per op
    assert y[0, 3] == np.float32(r16) + np.float32(1.0)
    m32 = _square_graph()
    assert emulate_fp16(m32) is m32  # nothing to emulate in an FP32 graph


def test_compare_graphs_reports_inf_and_psnr():
    m32, m16 = _square_graph(), _square_graph(T.FLOAT16)
    feeds = [{"x": np.array([[1, 2, 3, 4]], np.float32)}, {"x": np.array([[1000, 2, 3, 4]], np.float32)}]
    res = compare_graphs(m32, m16, feeds)
    y = res["y"]
    assert y.samples == 2 and y.inf == 1 and y.psnr == -math.inf and not y.finite
    ok = compare_graphs(m32, m16, feeds[:1])["y"]
    assert ok.finite and ok.psnr == math.inf and ok.max_abs_diff == 0.0
    rep = Report("t")
    rep.add(32, "g", res)
    md = rep.to_markdown()
    assert "| 32 | g | y | 1x4 | 2 |" in md and "-inf" in md
    assert rep.to_json()["rows"][0]["psnr"] == "-inf"

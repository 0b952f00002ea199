"""export.fp16: the precision-plan converter on hand-built graphs (fast, no torch export), plans,
and the converter on a real exported task graph (shares the exports of test_onnx.py's fixtures)."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from export.fp16 import (  # noqa: E402
    PLAN_FORMAT, convert_to_fp16, default_plan, fp32_reasons, load_plan, node_compute_dtypes,
    node_scope, validate_plan,
)
from runtime.errors import SgexError  # noqa: E402

F, H = TensorProto.FLOAT, TensorProto.FLOAT16


def _scoped(node, path):
    """Metadata as the dynamo exporter writes it (see export/fp16.py docstring)."""
    parts = path.split(".")
    scopes = [""] + [".".join(parts[: i + 1]) for i in range(len(parts))] + [node.op_type.lower()]
    helper.set_metadata_props(node, {"pkg.torch.onnx.name_scopes": repr(scopes)})
    return node


def _toy_model():
    """A graph with every construct the converter has to handle: a style vector chain, spatial
    convs, a scoped FP32 layer, statistics, Resize with float scales and int64 sizes computed from
    Shape, ConstantOfShape, Cast(to=FLOAT), a float Constant node, a weight read by both an FP16
    conv and an FP32 constant subgraph, and two float outputs (one spatial, one vector)."""
    rng = np.random.default_rng(0)
    W = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "W")
    W2 = numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3, "W2")
    B = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    axes_w = numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes_w")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    st, en = (numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((2, "st"), (4, "en")))
    head = numpy_helper.from_array(np.array([0], np.int64), "head")
    nodes = [
        helper.make_node("Mul", ["s", "two"], ["s2"], name="style_mul"),
        helper.make_node("Unsqueeze", ["s2", "axes"], ["s4"], name="style_unsq"),
        helper.make_node("Mul", ["x", "s4"], ["xm"], name="modulate"),
        _scoped(helper.make_node("Conv", ["xm", "W", "B"], ["c1"], name="conv_a", pads=[1, 1, 1, 1]),
                "decoder.conv1.conv"),
        helper.make_node("LeakyRelu", ["c1"], ["a1"], name="act_a", alpha=0.2),
        _scoped(helper.make_node("Conv", ["a1", "W2"], ["c2"], name="conv_b", pads=[1, 1, 1, 1]),
                "decoder.convs.0.conv"),
        helper.make_node("ReduceMean", ["c2", "axes"], ["mu"], name="stat_mean", keepdims=1),
        helper.make_node("Sub", ["c2", "mu"], ["cen"], name="center"),
        helper.make_node("ReduceSumSquare", ["W2", "axes_w"], ["wsq"], name="wsq", keepdims=1),
        helper.make_node("Reshape", ["wsq", "shape4"], ["wsq4"], name="wsq_reshape"),
        helper.make_node("Mul", ["cen", "wsq4"], ["cw"], name="demod_apply"),
        helper.make_node("Resize", ["cw", "", "scales"], ["up"], name="resize_scales", mode="nearest"),
        helper.make_node("Shape", ["up"], ["shp"], name="shape_up"),
        helper.make_node("Slice", ["shp", "st", "en"], ["hw"], name="slice_hw"),
        helper.make_node("Cast", ["hw"], ["hwf"], name="hw_float", to=F),
        helper.make_node("Mul", ["hwf", "half"], ["hwh"], name="hw_half"),
        helper.make_node("Cast", ["hwh"], ["hwi"], name="hw_int", to=TensorProto.INT64),
        helper.make_node("Slice", ["shp", "head", "st"], ["bc"], name="slice_bc"),
        helper.make_node("Concat", ["bc", "hwi"], ["sizes"], name="sizes", axis=0),
        helper.make_node("Resize", ["up", "", "", "sizes"], ["down"], name="resize_sizes", mode="nearest"),
        helper.make_node("ConstantOfShape", ["shp_d"], ["bias_map"], name="const_map",
                         value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Shape", ["down"], ["shp_d"], name="shape_down"),
        helper.make_node("Constant", [], ["half"], name="const_half",
                         value=numpy_helper.from_array(np.array(0.5, np.float32))),
        helper.make_node("Add", ["down", "bias_map"], ["db"], name="add_map"),
        helper.make_node("Cast", ["db"], ["dbf"], name="cast_float", to=F),
        helper.make_node("Tanh", ["dbf"], ["y"], name="out_tanh"),
        helper.make_node("Identity", ["mu"], ["stat"], name="stat_out"),
    ]
    shape4 = numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "shape4")
    order = ["const_half", "style_mul", "style_unsq", "modulate", "conv_a", "act_a", "conv_b",
             "stat_mean", "center", "wsq", "wsq_reshape", "demod_apply", "resize_scales", "shape_up",
             "slice_hw", "hw_float", "hw_half", "hw_int", "slice_bc", "sizes", "resize_sizes",
             "shape_down", "const_map", "add_map", "cast_float", "out_tanh", "stat_out"]
    by = {n.name: n for n in nodes}
    graph = helper.make_graph(
        [by[k] for k in order], "toy",
        [helper.make_tensor_value_info("x", F, ["batch", 3, "height", "width"]),
         helper.make_tensor_value_info("s", F, ["batch", 3])],
        [helper.make_tensor_value_info("y", F, ["batch", 4, "height", "width"]),
         helper.make_tensor_value_info("stat", F, ["batch", 4, 1, 1])],
        [W, W2, B, scales, axes, axes_w, two, st, en, head, shape4],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    onnx.checker.check_model(m, full_check=True)
    return m


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.fixture(scope="module")
def toy():
    return _toy_model()


def _feeds(b=2, h=8, w=12, seed=1):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((b, 3, h, w)).astype(np.float32),
            "s": rng.standard_normal((b, 3)).astype(np.float32)}


def test_node_scope_reads_dynamo_metadata(toy):
    by = {n.name: n for n in toy.graph.node}
    assert node_scope(by["conv_a"]) == "decoder.conv1.conv"
    assert node_scope(by["modulate"]) is None
    n = helper.make_node("Relu", ["a"], ["b"])
    helper.set_metadata_props(n, {"namespace": ": M/decoder: G/decoder.conv1: StyledConv/relu: aten.relu.default"})
    assert node_scope(n) == "decoder.conv1"


def test_fp32_reasons(toy):
    r = fp32_reasons(toy, {"fp32_scopes": ["decoder.conv1"], "fp32_nodes": ["add_map"]})
    assert r["conv_a"] == "scope" and r["add_map"] == "name"
    assert r["style_mul"] == r["style_unsq"] == r["stat_mean"] == r["hw_half"] == "vector"
    assert r["wsq"] == r["wsq_reshape"] == "const"
    for spatial in ("modulate", "act_a", "conv_b", "center", "demod_apply", "resize_scales",
                    "resize_sizes", "const_map", "cast_float", "out_tanh"):
        assert spatial not in r
    # a scope prefix matches children, not siblings with a common string prefix
    r2 = fp32_reasons(toy, {"fp32_scopes": ["decoder.conv"], "fp32_nodes": []})
    assert "conv_a" not in r2 and "conv_b" not in r2


@pytest.mark.parametrize("plan", [
    {"fp32_scopes": [], "fp32_nodes": []},
    {"fp32_scopes": ["decoder.conv1"], "fp32_nodes": ["add_map"]},
])
def test_convert_runs_and_respects_plan(toy, plan):
    m16 = convert_to_fp16(toy, plan, {"io_fp32": True, "vectors_fp32": True})
    onnx.checker.check_model(m16, full_check=True)
    # I/O stays float32 with the original names
    assert [(v.name, v.type.tensor_type.elem_type) for v in m16.graph.input] == [("x", F), ("s", F)]
    assert [(v.name, v.type.tensor_type.elem_type) for v in m16.graph.output] == [("y", F), ("stat", F)]
    keep = fp32_reasons(toy, plan)
    dtypes = node_compute_dtypes(m16)
    for name in keep:
        assert H not in dtypes.get(name, set()), f"plan-FP32 node {name} holds an FP16 tensor"
    for name in ("modulate", "conv_b", "center", "resize_sizes", "out_tanh"):
        assert dtypes[name] == {H}, name
    by = {n.name: n for n in m16.graph.node}
    assert by["cast_float"].attribute[0].i == H  # Cast(to=FLOAT) inside FP16 follows the node
    assert by["hw_float"].attribute[0].i == F  # vector cast stays FP32
    cos = [a for a in by["const_map"].attribute if a.name == "value"][0]
    assert cos.t.data_type == H
    assert by["resize_scales"].input[2] == "scales"  # scales stay float32
    inits = {i.name: i.data_type for i in m16.graph.initializer}
    assert inits["W2"] == F and inits["W2__fp16"] == H  # FP32 copy kept for the constant subgraph
    assert "W" not in inits or "conv_a" in keep  # FP32 original dropped when nothing reads it
    for b, h, w in ((2, 8, 12), (1, 16, 8)):
        feeds = _feeds(b, h, w)
        ref = _run(toy, feeds)
        got = _run(m16, feeds)
        for r, g in zip(ref, got):
            assert g.dtype == np.float32 and g.shape == r.shape
            np.testing.assert_allclose(g, r, atol=2e-2, rtol=2e-2)


def test_vectors_rule_off_puts_vectors_in_fp16(toy):
    m16 = convert_to_fp16(toy, {}, {"io_fp32": True, "vectors_fp32": False})
    d = node_compute_dtypes(m16)
    assert d["style_mul"] == {H} and d["stat_mean"] == {H}
    got, ref = _run(m16, _feeds()), _run(toy, _feeds())
    np.testing.assert_allclose(got[0], ref[0], atol=3e-2, rtol=3e-2)


def test_fp16_io_when_asked(toy):
    m16 = convert_to_fp16(toy, {}, {"io_fp32": False, "vectors_fp32": True})
    assert all(v.type.tensor_type.elem_type == H for v in list(m16.graph.input) + list(m16.graph.output))
    onnx.checker.check_model(m16, full_check=True)
    f = {k: v.astype(np.float16) for k, v in _feeds().items()}
    got = _run(m16, f)
    ref = _run(toy, _feeds())
    assert got[0].dtype == np.float16
    np.testing.assert_allclose(got[0].astype(np.float32), ref[0], atol=3e-2, rtol=3e-2)


def test_large_initializer_is_clipped(toy, caplog):
    m = onnx.ModelProto()
    m.CopyFrom(toy)
    for i in m.graph.initializer:
        if i.name == "B":
            i.CopyFrom(numpy_helper.from_array(np.array([1e6, 0, 0, 0], np.float32), "B"))
    m16 = convert_to_fp16(m, {}, {})
    b16 = {i.name: numpy_helper.to_array(i) for i in m16.graph.initializer}["B__fp16"]
    assert b16[0] == np.float16(65504) and "clipped" in caplog.text


def test_default_plan_is_valid_for_every_task():
    from runtime.tasks import TASKS

    for name, task in TASKS.items():
        p = default_plan(name)
        assert p["format"] == PLAN_FORMAT and set(p["graphs"]) == set(task.graphs)
        assert validate_plan(json.loads(json.dumps(p)), name)["rules"] == {"io_fp32": True, "vectors_fp32": True}


@pytest.mark.parametrize("edit, match", [
    (lambda p: p.update(format="x"), "not an sgex precision plan"),
    (lambda p: p.update(version=9), "version 9 is not supported"),
    (lambda p: p.update(task="toonify"), "plan is for task 'toonify'"),
    (lambda p: p["graphs"].update(translate={}), "unknown graph 'translate'"),
    (lambda p: p["graphs"]["synth"].update(fp32_scopes="decoder"), "must be a list of strings"),
    (lambda p: p["graphs"]["synth"].update(extra=[]), "only fp32_scopes and fp32_nodes"),
    (lambda p: p.update(rules={"io_fp32": "yes"}), "'rules' must map"),
])
def test_bad_plan_refused(tmp_path, edit, match):
    p = default_plan("superres")
    edit(p)
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(p))
    with pytest.raises(SgexError, match=match):
        load_plan(f, "superres")


def test_plan_file_errors(tmp_path):
    with pytest.raises(SgexError, match="does not exist"):
        load_plan(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SgexError, match="not valid JSON"):
        load_plan(tmp_path / "bad.json")

"""OpenVINO backend: FP32 against ONNX Runtime FP32 on every task, the BF16 gate on random-weight
checkpoints of every task (values printed: run with -s), refusal without a passing gate, the
simulated CPU without BF16, per-node FP32 pins, explicit FP32, auto choice, cache and threads.

Every export is tiny (width_div 4, one bucket of outputs up to 128, i.e. x1 up to 32, max batch 2)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

from runtime.backends import create, openvino_bf16_ready  # noqa: E402
from runtime.engine import make_random_inputs  # noqa: E402
from runtime.errors import SgexError  # noqa: E402
from runtime.manifest import BF16_GATE, Manifest  # noqa: E402
from runtime.tasks import TASKS, get_task  # noqa: E402

RES = 128  # the exported bucket (output side): tests/conftest.py FP32_EXPORT_RES
X1 = RES // 4  # the x1 side the tests feed
# the engine tests' tolerances (tests/runtime/test_engine.py): w+ within 2e-4 of its peak (the tiny
# random encoder reaches ~1e3), y within 1e-4 absolute on w+ rescaled to real checkpoints' O(1)
WPLUS_TOL, Y_ATOL = 2e-4, 1e-4
TARGET_PSNR = 40.0


def _native_bf16() -> bool:
    import openvino as ov

    from runtime.backends.openvino import bf16_support

    return bf16_support(ov.Core())[0]


needs_bf16 = pytest.mark.skipif(not _native_bf16(), reason="this CPU has no native BF16")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, fp32_export):
    """exports(task) -> a fresh copy of the session's tiny FP32 export of `task` at RES
    (tests/conftest.py fp32_export, shared with the calib and bench tests)."""
    root = tmp_path_factory.mktemp("ov-exports")

    def get(task: str):
        dst = root / f"copy-{task}-{len(os.listdir(root))}"
        shutil.copytree(fp32_export(task), dst)
        return dst

    return get


def _feeds(task: str, manifest, wplus=None, batch: int = 2):
    spec = get_task(task)
    rng = np.random.default_rng(1)
    g = manifest.graph(f"{spec.graphs[-1]}@{RES}")
    names = [i["name"] for i in g["inputs"]]
    c = spec.in_channels
    x = rng.uniform(-1, 1, (batch, c, X1, X1)).astype(np.float32)
    feeds = make_random_inputs(3, batch, X1, X1, noise=any(n.startswith("noise_") for n in names),
                               z_dim=manifest.style_dim if "z" in names else None)
    feeds["x1" if "x1" in names else "x"] = x
    if "wplus" in names:
        feeds["wplus"] = wplus
    if "editing_w" in names:
        feeds["editing_w"] = rng.standard_normal((batch, 18, manifest.style_dim)).astype(np.float32) * 0.1
    return {n: feeds[n] for n in names}


# Each task costs a tiny export and two OpenVINO compiles per graph (~1.5 min on the 2-core CI
# machine). The default run covers the three graph families (superres: noise inputs and fusion;
# edit: editing_w and attention; the translate graph of sketch2face, through the calib CLI test
# below); `-m slow` runs the other four tasks here too.
DEFAULT_TASKS = ("superres", "edit")


@pytest.mark.parametrize("task", [t if t in DEFAULT_TASKS else pytest.param(t, marks=pytest.mark.slow)
                                  for t in TASKS])
def test_fp32_matches_ort_and_bf16_gate_passes(task, exports, capsys):
    d = exports(task)
    m = Manifest.load(d)
    ort = create("ort", d, m, "cpu")
    ov = create("openvino", d, m, "cpu", precision="fp32", intra_op_threads=1)
    key = f"{get_task(task).graphs[-1]}@{RES}"
    wplus = None
    if "style" in m.graphs:
        x2 = np.random.default_rng(0).uniform(-1, 1, (2, 3, 256, 256)).astype(np.float32)
        w_ort, w_ov = ort.run("style", {"x2": x2})["wplus"], ov.run("style", {"x2": x2})["wplus"]
        assert np.abs(w_ov - w_ort).max() <= WPLUS_TOL * max(1.0, float(np.abs(w_ort).max()))
        wplus = (w_ort * (2.0 / np.abs(w_ort).max())).astype(np.float32)
    feeds = _feeds(task, m, wplus)
    y_ort, y_ov = ort.run(key, feeds)["y"], ov.run(key, feeds)["y"]
    assert y_ov.shape == y_ort.shape == (2, 3, 4 * X1, 4 * X1)
    np.testing.assert_allclose(y_ov, y_ort, atol=Y_ATOL)
    if not _native_bf16():
        pytest.skip("FP32 checked; the BF16 gate needs a CPU with native BF16")
    from calib.bf16 import gate_artifacts, write_gate

    record, report = gate_artifacts(d, samples=1, seed=0, target_psnr=TARGET_PSNR, threads=1)
    with capsys.disabled():
        print(f"\n[bf16 gate {task}] " + "; ".join(
            f"{k}: {r['psnr']} dB, max|diff| {max(o['max_abs_diff'] for o in r['outputs'].values()):.3g}, "
            f"FP32 units {r['fp32_units'] or 'none'}" for k, r in sorted(record["graphs"].items())))
    assert set(record["graphs"]) == set(m.graphs)
    for k, r in record["graphs"].items():
        assert r["sha256"] == m.graph(k)["sha256"]
        for o in r["outputs"].values():
            assert o["nan"] == 0 and o["inf"] == 0
            assert float(o["psnr"]) >= TARGET_PSNR, (k, o)
    if "style" in m.graphs:  # the style -> synth chain is gated as well
        (pk, pr), = record["pipeline"].items()
        assert pk == key and pr["passed"] and float(pr["psnr"]) >= TARGET_PSNR
        with capsys.disabled():
            print(f"[bf16 gate {task}] pipeline {pk}: {pr['psnr']} dB, style graph "
                  f"{record['graphs']['style']['graph_precision']}")
    else:
        assert record["pipeline"] == {}
    assert record["passed"] and record["version"] == 2
    write_gate(d, record)
    m2 = Manifest.load(d)
    assert openvino_bf16_ready(m2) == (True, "")
    bf = create("openvino", d, m2, "cpu", precision="bf16", intra_op_threads=1)  # not forced: the gate passed
    from calib.compare import psnr

    y_bf = bf.run(key, feeds)["y"]
    assert psnr(y_ov, y_bf) >= TARGET_PSNR - 10  # other inputs than the gate's; a coarse sanity bound


def test_fp32_is_explicit_f32(tiny_superres_export):
    m = Manifest.load(tiny_superres_export)
    ov = create("openvino", tiny_superres_export, m, "cpu")
    precs = set(ov.runtime_precisions(f"synth@{m.buckets()[0].side}").values())
    assert "bf16" not in precs and "f32" in precs
    assert ov.config["INFERENCE_PRECISION_HINT"] == "f32"


def test_threads_default_to_affinity_and_cache_next_to_artifacts(exports):
    d = exports("superres")
    m = Manifest.load(d)
    ov = create("openvino", d, m, "cpu")
    assert ov.threads == len(os.sched_getaffinity(0))
    ov.run("style", {"x2": np.zeros((1, 3, 256, 256), np.float32)})
    assert ov.cache is not None and ov.cache.parent == d / ".openvino-cache"
    assert any(p.suffix == ".blob" for p in ov.cache.iterdir())
    m.verify(d)  # the cache is not an artifact: the manifest's files are untouched


@needs_bf16
def test_bf16_refused_without_passing_gate_unless_forced(exports, caplog):
    d = exports("superres")
    m = Manifest.load(d)
    with pytest.raises(SgexError, match="precision bf16 refused: the manifest has no BF16 accuracy report"):
        create("openvino", d, m, "cpu", precision="bf16")
    with caplog.at_level(logging.WARNING):
        be = create("openvino", d, m, "cpu", precision="bf16", force_precision=True)
    assert "BF16 FORCED" in caplog.text and be.precision == "bf16"
    # a record of another file, or a failed one, is refused as well
    gate = _passing_gate(m)
    gate["graphs"]["style"]["sha256"] = "0" * 64
    m.data[BF16_GATE] = gate
    with pytest.raises(SgexError, match="measured on another file"):
        create("openvino", d, m, "cpu", precision="bf16")
    gate["graphs"]["style"].update(sha256=m.graph("style")["sha256"], passed=False, psnr=31.0)
    with pytest.raises(SgexError, match="failed the BF16 accuracy gate"):
        create("openvino", d, m, "cpu", precision="bf16")
    # both graphs pass but the style -> synth pipeline does not: refused too
    gate = m.data[BF16_GATE] = _passing_gate(m)
    gate["pipeline"][f"synth@{RES}"].update(passed=False, psnr=37.7)
    with pytest.raises(SgexError, match=rf"the style -> synth@{RES} pipeline failed the BF16 accuracy gate \(PSNR 37.7"):
        create("openvino", d, m, "cpu", precision="bf16")
    # a record of the first format (no pipeline gate) is refused with a re-run hint
    m.data[BF16_GATE] = {**_passing_gate(m), "version": 1}
    with pytest.raises(SgexError, match="version 1, this sgex reads version 2.*re-run"):
        create("openvino", d, m, "cpu", precision="bf16")
    # the gate kept the style graph whole in FP32: compiled with the f32 hint under bf16
    m.data[BF16_GATE] = gate = _passing_gate(m)
    gate["graphs"]["style"]["graph_precision"] = "fp32"
    be = create("openvino", d, m, "cpu", precision="bf16")
    be.compiled("style"), be.compiled(f"synth@{RES}")
    assert be._compiled["style"].get_property("INFERENCE_PRECISION_HINT") == ov_type("f32")  # noqa: SLF001
    assert be._compiled[f"synth@{RES}"].get_property("INFERENCE_PRECISION_HINT") == ov_type("bf16")  # noqa: SLF001
    be.close()


def ov_type(name: str):
    import openvino as ov

    return {"f32": ov.Type.f32, "bf16": ov.Type.bf16}[name]


def _passing_gate(m) -> dict:
    """A hand-made passing record of the current version for manifest m."""
    return {"format": "sgex-bf16-gate", "version": 2, "passed": True, "target_psnr": 40.0,
            "graphs": {k: {"sha256": g["sha256"], "passed": True, "fp32_nodes": [], "graph_precision": "bf16"}
                       for k, g in m.graphs.items()},
            "pipeline": {k: {"passed": True, "psnr": 45.0} for k in m.graphs if k != "style"}}


def test_cpu_without_bf16_gets_one_line(tiny_superres_export, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from runtime.cli import main

    monkeypatch.setenv("SGEX_ASSUME_NO_BF16", "1")
    m = Manifest.load(tiny_superres_export)
    with pytest.raises(SgexError, match="needs a CPU with native BF16"):
        create("openvino", tiny_superres_export, m, "cpu", precision="bf16", force_precision=True)
    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    rc = main(["--task", "superres", "--artifacts", str(tiny_superres_export), "--backend", "openvino",
               "--precision", "bf16", "--force-precision", "--no-align", "--input", str(img), "--output", str(tmp_path / "o.png")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert rc == 2 and len(err) == 1 and "native BF16" in err[0], err
    assert not (tmp_path / "o.png").exists()


def _conv_graph(x: str = "x", out: str = "z", name: str = "a", seed: int = 0, cout: int = 8) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((cout, 4, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", [x, "w"], ["y"], pads=[1, 1, 1, 1], name=f"conv_{name}"),
             helper.make_node("Relu", ["y"], [out], name=f"relu_{name}")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["B", 4, "H", "W"])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["B", cout, "H", "W"])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _toy_pipeline():
    """A one-conv "style" graph (x2 -> wplus) feeding a one-conv "synth" graph (wplus -> y), both
    gated on FP32 inputs at an unreachable target, so each ends with its conv pinned FP32."""
    import openvino as ov

    from calib.bf16 import _Graph, _Pipeline, gate_graph

    core = ov.Core()
    x2 = [{"x2": np.random.default_rng(i).standard_normal((1, 4, 8, 8)).astype(np.float32)} for i in range(2)]
    style = _Graph(core, "style", _conv_graph("x2", "wplus", "s", 1, cout=4), x2, 1, None)
    wref = [style._run(core.compile_model(core.read_model(style.data), "CPU", style.cfg32), f)["wplus"] for f in x2]
    synth = _Graph(core, "synth@32", _conv_graph("wplus", "out", "t", 2), [{"wplus": w} for w in wref], 1, None)
    rec = gate_graph(synth, target_psnr=200.0)
    assert rec["passed"] and rec["fp32_nodes"] == ["conv_t"]
    pipe = _Pipeline(style, [(synth, synth.bf16(rec["fp32_nodes"]), lambda i, w: {"wplus": w}, x2)])
    style_rec = {"passed": True, "graph_precision": "bf16", "fp32_units": [], "fp32_nodes": []}
    return pipe, style_rec


@needs_bf16
def test_pipeline_gate_pins_style_units_when_the_chain_misses():
    """Style passes (pretended: no pins) and synth passes, but BF16 style codes into the synth graph
    miss 200 dB: the pipeline gate moves the style conv to FP32, and the chain is then exact."""
    from calib.bf16 import gate_pipeline

    pipe, style_rec = _toy_pipeline()
    per = gate_pipeline(pipe, style_rec, target_psnr=200.0)
    assert style_rec["fp32_units"] == ["node:conv_s"] and style_rec["fp32_nodes"] == ["conv_s"]
    assert style_rec["graph_precision"] == "bf16" and style_rec["pipeline_probes"] == 2
    assert per["synth@32"]["out"].psnr == math.inf


@needs_bf16
def test_pipeline_gate_falls_back_to_a_whole_fp32_style_graph(monkeypatch):
    """When no style unit can be pinned (here: none offered), the style graph is compiled FP32."""
    import calib.bf16 as cb

    pipe, style_rec = _toy_pipeline()
    monkeypatch.setattr(cb, "fp32_units", lambda data, ops: {})
    per = cb.gate_pipeline(pipe, style_rec, target_psnr=200.0)
    assert style_rec["graph_precision"] == "fp32" and style_rec["fp32_nodes"] == []
    assert per["synth@32"]["out"].psnr == math.inf


@needs_bf16
def test_pin_keeps_a_node_fp32():
    import openvino as ov

    from runtime.backends.openvino import compile_config, pin_fp32

    core, data = ov.Core(), _conv_graph()
    cfg = compile_config("bf16", 1, None)

    def conv_precision(model):
        rm = core.compile_model(model, "CPU", cfg).get_runtime_model()
        return [op.get_rt_info()["runtimePrecision"].astype(str) for op in rm.get_ordered_ops()
                if op.get_rt_info()["layerType"].astype(str) == "Convolution"]

    assert conv_precision(core.read_model(data)) == ["bf16"]
    assert conv_precision(pin_fp32(core, data, ["conv_a"])) == ["f32"]
    with pytest.raises(SgexError, match="match no op"):
        pin_fp32(core, data, ["no_such_node"])


@needs_bf16
def test_auto_picks_openvino_bf16_only_with_a_passing_gate(exports, caplog):
    d = exports("superres")
    m = Manifest.load(d)
    with caplog.at_level(logging.INFO, logger="runtime.backends"):
        assert create("auto", d, m, "cpu").name == "ort"
    assert "backend auto -> ort" in caplog.text and "no BF16 accuracy report" in caplog.text
    m.data[BF16_GATE] = _passing_gate(m)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="runtime.backends"):
        be = create("auto", d, m, "cpu")
    assert be.name == "openvino" and be.precision == "bf16"
    assert "backend auto -> openvino bf16" in caplog.text


def test_precision_on_other_backends_is_an_error(tiny_superres_export):
    m = Manifest.load(tiny_superres_export)
    with pytest.raises(SgexError, match="openvino backend only"):
        create("ort", tiny_superres_export, m, "cpu", precision="fp32")
    with pytest.raises(SgexError, match="runs on the CPU"):
        create("openvino", tiny_superres_export, m, "cuda")


def test_calib_bf16_cli_records_in_manifest(exports, capsys):
    if not _native_bf16():
        pytest.skip("needs native BF16")
    from calib.cli import main

    d = exports("sketch2face")
    rc = main(["--bf16", "--artifacts", str(d), "--samples", "1", "--threads", "1",
               "--report", str(d / "bf16.md")])
    out = capsys.readouterr().out
    assert rc == 0 and "bf16 gate PASSED" in out
    gate = json.loads((d / "manifest.json").read_text())[BF16_GATE]
    assert gate["passed"] and set(gate["graphs"]) == {f"translate@{RES}"}
    assert (d / "bf16.md").is_file() and (d / "bf16.json").is_file()
    Manifest.load(d).verify(d)


@needs_bf16
def test_gate_search_pins_the_layers_that_miss_the_target():
    """An unreachable target for BF16 (PSNR 200 dB) on a one-conv graph: the search must move the
    conv to FP32, and the pinned conv must really run f32 (then BF16 equals FP32 exactly)."""
    import openvino as ov

    from calib.bf16 import _Graph, gate_graph

    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4, 8, 8)).astype(np.float32)} for i in range(2)]
    g = _Graph(ov.Core(), "conv", _conv_graph(), feeds, 1, None)
    unpinned = gate_graph(g, target_psnr=1.0)
    assert unpinned["passed"] and unpinned["fp32_units"] == [] and math.isfinite(float(unpinned["psnr"]))
    rec = gate_graph(g, target_psnr=200.0)
    assert rec["passed"] and rec["fp32_units"] == ["node:conv_a"] and rec["fp32_nodes"] == ["conv_a"]
    assert rec["psnr"] == "inf" and rec["pins_held"] == {"f32": 1, "bf16": 0}

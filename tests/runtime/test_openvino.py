"""OpenVINO backend: FP32 against ONNX Runtime FP32 on every task, the BF16 gate on random-weight
checkpoints of every task (values printed: run with -s), refusal without a passing gate, the
simulated CPU without BF16, per-node FP32 pins, explicit FP32, auto choice, cache and threads.

Every export is tiny (width_div 4, one bucket of side 32, max batch 2)."""

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

SIDE = 32
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
def exports(tmp_path_factory, tiny_ckpt):
    """exports(task) -> a fresh copy of a tiny export of `task` (made once per module)."""
    from export.onnx import export_task

    root = tmp_path_factory.mktemp("ov-exports")
    made: dict = {}

    def get(task: str):
        if task not in made:
            export_task(task, SIDE, ckpt=tiny_ckpt(task), out=root / "src", max_batch=2, progress=False)
            made[task] = root / "src" / task
        dst = root / f"copy-{task}-{len(os.listdir(root))}"
        shutil.copytree(made[task], dst)
        return dst

    return get


def _feeds(task: str, manifest, wplus=None, batch: int = 2):
    spec = get_task(task)
    rng = np.random.default_rng(1)
    g = manifest.graph(f"{spec.graphs[-1]}@{SIDE}")
    names = [i["name"] for i in g["inputs"]]
    c = spec.in_channels
    x = rng.uniform(-1, 1, (batch, c, SIDE, SIDE)).astype(np.float32)
    feeds = make_random_inputs(3, batch, SIDE, SIDE, noise=any(n.startswith("noise_") for n in names),
                               z_dim=manifest.style_dim if "z" in names else None)
    feeds["x1" if "x1" in names else "x"] = x
    if "wplus" in names:
        feeds["wplus"] = wplus
    if "editing_w" in names:
        feeds["editing_w"] = rng.standard_normal((batch, 18, manifest.style_dim)).astype(np.float32) * 0.1
    return {n: feeds[n] for n in names}


@pytest.mark.parametrize("task", list(TASKS))
def test_fp32_matches_ort_and_bf16_gate_passes(task, exports, capsys):
    d = exports(task)
    m = Manifest.load(d)
    ort = create("ort", d, m, "cpu")
    ov = create("openvino", d, m, "cpu", precision="fp32", intra_op_threads=1)
    key = f"{get_task(task).graphs[-1]}@{SIDE}"
    wplus = None
    if "style" in m.graphs:
        x2 = np.random.default_rng(0).uniform(-1, 1, (2, 3, 256, 256)).astype(np.float32)
        w_ort, w_ov = ort.run("style", {"x2": x2})["wplus"], ov.run("style", {"x2": x2})["wplus"]
        assert np.abs(w_ov - w_ort).max() <= WPLUS_TOL * max(1.0, float(np.abs(w_ort).max()))
        wplus = (w_ort * (2.0 / np.abs(w_ort).max())).astype(np.float32)
    feeds = _feeds(task, m, wplus)
    y_ort, y_ov = ort.run(key, feeds)["y"], ov.run(key, feeds)["y"]
    assert y_ov.shape == y_ort.shape == (2, 3, 4 * SIDE, 4 * SIDE)
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
    assert record["passed"]
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
    precs = set(ov.runtime_precisions(f"synth@{SIDE}").values())
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
    gate = {"graphs": {k: {"sha256": g["sha256"], "passed": True, "fp32_nodes": []} for k, g in m.graphs.items()},
            "target_psnr": 40.0}
    gate["graphs"]["style"]["sha256"] = "0" * 64
    m.data[BF16_GATE] = gate
    with pytest.raises(SgexError, match="measured on another file"):
        create("openvino", d, m, "cpu", precision="bf16")
    gate["graphs"]["style"].update(sha256=m.graph("style")["sha256"], passed=False, psnr=31.0)
    with pytest.raises(SgexError, match="failed the BF16 accuracy gate"):
        create("openvino", d, m, "cpu", precision="bf16")


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


def _conv_graph() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv_a"),
             helper.make_node("Relu", ["y"], ["z"], name="relu_a")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, "H", "W"])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", 8, "H", "W"])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


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
    m.data[BF16_GATE] = {"target_psnr": 40.0, "graphs": {
        k: {"sha256": g["sha256"], "passed": True, "fp32_nodes": []} for k, g in m.graphs.items()}}
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
    assert gate["passed"] and set(gate["graphs"]) == {f"translate@{SIDE}"}
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

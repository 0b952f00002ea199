"""sgex-bench on the tiny model (width_div=4) at a tiny bucket: the JSON carries every field for
torch-official, torch and ort; accuracy is checked against the baseline; an unavailable backend
named explicitly is a one-line error. No assertion on timings (shared CI machines)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from bench import cli as bench

TINY = ["--random-weights", "--width-div", "4", "--iters", "2", "--warmup", "1"]
STATS = ("n", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms")
# Tolerances vs the FP32 baseline on CPU, relative to the baseline's largest |value| (random
# weights put outputs far outside [-1, 1], ~1e4 here). torch runs the same maths in another order
# (modulated input vs grouped weights): measured ~6e-7. ONNX Runtime's default optimisation level
# (NCHWc conv kernels, fused ops) rounds differently per op and random weights amplify it through
# ~100 layers (even torch FP32 vs FP64 differs by 2.5e-4 at full size): measured ~8e-5 here. A
# wrong op, input or weight gives O(1) (stale exported weights measured 1.0).
REL_TOL = {"torch": 1e-5, "ort": 1e-3}


def _run(argv, capsys):
    rc = bench.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def image_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    js, png = out / "r.json", out / "r.png"
    rc = bench.main(["--task", "superres", "--res", "256", "--backends", "torch-official,torch,ort",
                     *TINY, "--json", str(js), "--plot", str(png)])
    assert rc == 0
    return json.loads(js.read_text()), png


def test_image_json_has_every_field(image_result):
    r, png = image_result
    assert r["format"] == "sgex-bench" and r["version"] == 1
    assert r["command"].startswith("sgex-bench --task superres --res 256")
    assert r["backends"] == ["torch-official", "torch", "ort"] and r["baseline"] == "torch-official"
    m = r["machine"]
    for k in ("device_name", "cpu_model", "cpu_count", "load_avg_start", "load_avg_end", "platform"):
        assert k in m
    assert m["device_name"]
    assert r["versions"]["torch"] and r["versions"]["onnxruntime"]
    assert r["threads"]["torch_intra_op"] >= 1
    assert r["checkpoint"]["random"] is True and r["checkpoint"]["width_div"] == 4
    assert r["noise"] == "explicit"  # superres: seeded explicit noise, the same for every backend

    (run,) = r["runs"]
    assert run["res"] == 256 and run["x1"] == 64 and run["output_shape"] == [1, 3, 256, 256]  # bucket = output side
    assert run["shapes"]["x1"] == [1, 3, 64, 64] and run["shapes"]["x2"] == [1, 3, 256, 256]
    assert len(run["shapes"]["noise"]) == 17
    g = run["gflop"]
    # the official recipe also runs the 18 x1 style heads: it must count more work than sgex's path
    assert 0 < g["per_image_sgex"] < g["per_image_official"]

    for name in ("torch-official", "torch", "ort"):
        row = run["backends"][name]
        assert row["precision"] == "fp32" and row["timer"] == "perf_counter"
        assert row["detail"]
        for s in STATS:
            assert s in row["latency"] and s in row["frame_latency"]
        assert row["latency"]["n"] == 2 and len(row["raw_ms"]["call"]) == 2
        lat = row["latency"]
        assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
        assert row["throughput"] > 0 and row["throughput_unit"] == "images/s"
        assert row["achieved_tflops"] > 0
        assert row["memory"]["peak_mb"] > 0 and row["memory"]["method"]
        assert row["speedup_vs_baseline"] > 0
        assert row["time_ratio_vs_baseline"] == pytest.approx(1 / row["speedup_vs_baseline"])
        acc = row["accuracy"]
        assert acc["vs"] == "torch-official" and acc["finite"]
    assert run["backends"]["torch-official"]["speedup_vs_baseline"] == 1.0
    assert run["backends"]["torch-official"]["style_latency"] is None  # style inside forward_official
    for name in ("torch", "ort"):
        row = run["backends"][name]
        assert row["style_latency"]["n"] == 2
        acc = row["accuracy"]
        assert acc["rel_max_abs_diff"] < REL_TOL[name], (name, acc)
        assert acc["psnr_ref_range_db"] is None or acc["psnr_ref_range_db"] > 50, (name, acc)
        assert acc["max_abs_diff"] <= acc["rel_max_abs_diff"] * acc["ref_abs_max"] * (1 + 1e-9)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_names_every_backend(image_result):
    r, _ = image_result
    table = bench.format_table(r)
    for name in ("torch-official", "torch", "ort", "p50 ms", "max|diff|", "rel"):
        assert name in table


def test_video_mode_style_once_per_clip(tmp_path, capsys):
    js = tmp_path / "v.json"
    rc, out, err = _run(["--task", "toonify", "--res", "128", "--mode", "video", "--frames", "2",
                         "--backends", "torch-official,torch", "--random-weights", "--width-div", "4",
                         "--iters", "1", "--warmup", "0", "--json", str(js)], capsys)
    assert rc == 0, err
    r = json.loads(js.read_text())
    assert r["noise"] == "zero"  # toonify: the official video recipe uses zero noise
    (run,) = r["runs"]
    assert run["frames"] == 2 and run["shapes"]["frames"] == 2 and "noise" not in run["shapes"]
    base, sg = run["backends"]["torch-official"], run["backends"]["torch"]
    assert base["throughput_unit"] == "frames/s"
    # one clip of 2 frames; the baseline recomputes the style inside every frame, sgex once per clip
    assert len(base["raw_ms"]["frame"]) == 2 and len(sg["raw_ms"]["frame"]) == 2
    assert base["style_latency"] is None and sg["style_latency"]["n"] == 1
    assert sg["raw_ms"]["call"][0] == pytest.approx(sg["raw_ms"]["style"][0] + sum(sg["raw_ms"]["frame"]))
    assert sg["accuracy"]["compared"] == "frames 0 and last"
    assert sg["accuracy"]["rel_max_abs_diff"] < REL_TOL["torch"]
    # per frame, sgex's useful work excludes the style network the baseline reruns
    assert run["gflop"]["per_image_sgex"] < run["gflop"]["per_image_official"]
    assert "frames/s" in out


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_unavailable_backend_is_one_line_error(capsys):
    rc, out, err = _run(["--task", "superres", "--res", "256", "--backends", "torch,trt", *TINY], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "trt" in lines[0] and "TensorRT" in lines[0] and "pip install" in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [
    (["--res", "100"], "multiple of 32"),
    (["--res", "256", "--backends", "onnx"], "unknown backend"),
    (["--res", "256", "--iters", "0"], "--iters"),
])
def test_bad_arguments_are_one_line_errors(argv, needle, capsys):
    rc, _, err = _run(["--task", "superres", *argv, *TINY[:3]], capsys)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_torch_variants_only_when_named(capsys, tmp_path):
    # torch-cudagraph needs CUDA: a one-line error here, never a silent skip or an eager run
    rc, _, err = _run(["--task", "superres", "--res", "64", "--backends", "torch-official,torch-cudagraph",
                       *TINY], capsys)
    assert rc == 2 and "CUDA graphs need --device cuda" in err and len(err.strip().splitlines()) == 1
    chosen = bench.resolve_backends(bench.BenchConfig(task="superres", res=(64,), random_weights=True))
    assert not set(chosen) & set(bench.TORCH_VARIANTS)
    bad = tmp_path / "plan.json"
    bad.write_text('{"format": "nope"}')
    for argv, needle in ((["--compile-mode", "fastest"], "--compile-mode"),
                         (["--plan", str(bad)], "not an sgex precision plan")):
        rc, _, err = _run(["--task", "superres", "--res", "64", *argv, *TINY], capsys)
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_summarize_and_compare():
    s = bench.summarize([float(v) for v in range(1, 102)])
    assert (s["p50_ms"], s["p90_ms"], s["p99_ms"], s["mean_ms"], s["n"]) == (51.0, 91.0, 100.0, 51.0, 101)
    ref = np.zeros((1, 3, 4, 4), np.float32)
    c = bench.compare(ref + 0.02, ref)
    assert c["max_abs_diff"] == pytest.approx(0.02) and c["psnr_db"] == pytest.approx(10 * np.log10(4 / 4e-4))
    ref2 = np.linspace(-10, 10, 48, dtype=np.float32).reshape(1, 3, 4, 4)
    c = bench.compare(ref2 + 0.5, ref2)
    assert c["rel_max_abs_diff"] == pytest.approx(0.05) and c["ref_range"] == pytest.approx(20)
    assert c["psnr_ref_range_db"] == pytest.approx(10 * np.log10(400 / 0.25))
    assert bench.compare(ref, ref)["identical"] and bench.compare(ref, ref)["psnr_db"] is None
    assert not bench.compare(ref + np.nan, ref)["finite"]


def test_disagreement_fp32_by_relative_diff_bf16_by_the_gates_psnr():
    ref = np.linspace(-10, 10, 48, dtype=np.float32).reshape(1, 3, 4, 4)
    near, far = bench.compare(ref + 0.05, ref), bench.compare(ref + 0.5, ref)  # rel 5e-3 / 5e-2
    assert bench.disagreement(near, "fp32") is None and "relative" in bench.disagreement(far, "fp32")
    # BF16 is judged by PSNR with the reference's range (20) as peak: +0.5 is 32 dB (refused), +0.1
    # is 46 dB (accepted) although its relative max |diff| (1e-2) is at FP32's limit
    assert "PSNR 32.0 dB" in bench.disagreement(far, "bf16")
    assert bench.disagreement(bench.compare(ref + 0.1, ref), "bf16") is None  # 46 dB
    assert bench.disagreement(bench.compare(ref + np.nan, ref), "bf16") == "non-finite output"


def test_default_backends_are_the_available_ones_and_logged(caplog):
    cfg = bench.BenchConfig(task="superres", res=(256,), random_weights=True)
    with caplog.at_level("INFO", logger="bench.cli"):
        chosen = bench.resolve_backends(cfg)
    assert chosen[0] == "torch-official" and "torch" in chosen
    assert ("ort" in chosen) == (importlib.util.find_spec("onnxruntime") is not None)
    assert ("trt" in chosen) == (bench.backend_unavailable("trt", "cpu", None, "superres") is None)
    assert "trt" not in chosen  # TensorRT needs --device cuda and engines
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "backends (all available)" in msg and "skipped trt" in msg


def _native_bf16() -> bool:
    if importlib.util.find_spec("openvino") is None:
        return False
    import openvino as ov

    from runtime.backends.openvino import bf16_support

    return bf16_support(ov.Core())[0]


@pytest.mark.skipif(not _native_bf16(), reason="needs OpenVINO and a CPU with native BF16")
def test_openvino_fp32_and_bf16_rows(tmp_path, capsys, fp32_export):
    """The committed CPU command at tiny size: an export (a copy of the session's tiny superres
    export, the same random weights as --random-weights --width-div 4 --seed 0), BF16 gate, then
    the benchmark reads the gated artifacts; openvino-bf16 on an ungated export is a one-line
    error."""
    import shutil

    from calib.bf16 import gate_artifacts, write_gate

    res = fp32_export.res
    shutil.copytree(fp32_export("superres"), tmp_path / "superres")
    art = ["--artifacts", str(tmp_path)]
    argv = ["--task", "superres", "--res", str(res), *TINY, "--seed", "0", *art]
    rc, _, err = _run([*argv, "--backends", "torch-official,openvino-bf16"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "BF16 accuracy report" in err, err
    record, _ = gate_artifacts(tmp_path / "superres", samples=1, threads=1)
    write_gate(tmp_path / "superres", record)
    js = tmp_path / "r.json"
    rc, out, err = _run([*argv, "--backends", "torch-official,ort,openvino-fp32,openvino-bf16", "--json", str(js)],
                        capsys)
    assert rc == 0, err
    r = json.loads(js.read_text())
    assert r["backends"] == ["torch-official", "ort", "openvino-fp32", "openvino-bf16"]
    assert r["versions"]["openvino"]
    rows = r["runs"][0]["backends"]
    assert rows["openvino-fp32"]["precision"] == "fp32" and rows["openvino-bf16"]["precision"] == "bf16"
    synth = f"synth@{res}"
    assert rows["openvino-fp32"]["settings"][synth]["config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert rows["openvino-bf16"]["settings"][synth]["config"]["INFERENCE_PRECISION_HINT"] == "bf16"
    assert rows["openvino-fp32"]["accuracy"]["rel_max_abs_diff"] <= REL_TOL["ort"]
    assert rows["openvino-bf16"]["accuracy"]["finite"]
    assert rows["openvino-bf16"]["accuracy"]["psnr_ref_range_db"] >= 30  # vs the FP32 baseline, end to end
    assert "openvino-bf16" in out
    # the end-to-end video rows build their Engine the same way (bench name -> backend + precision)
    eng = bench.exported_engine("openvino-bf16", str(tmp_path / "superres"), "cpu", "superres")
    try:
        assert "CPU bf16" in eng.backend.describe()
    finally:
        eng.close()


def test_video_mode_end_to_end_on_both_libraries(tmp_path, capsys):
    """decode + model + encode through runtime.video, serial and pipelined, OpenCV and PyAV: every
    field present and consistent with its raw timings (no assertion on speed: shared machines)."""
    pytest.importorskip("av")
    js = tmp_path / "e.json"
    rc, out, err = _run(["--task", "toonify", "--res", "32", "--mode", "video", "--frames", "3", "--batch", "2",
                         "--backends", "torch", "--random-weights", "--width-div", "4",
                         "--iters", "1", "--warmup", "0", "--json", str(js)], capsys)
    assert rc == 0, err
    (run,) = json.loads(js.read_text())["runs"]
    e2e = run["end_to_end"]
    assert e2e["clip"]["frames"] == 3 and e2e["clip"]["size"] == [8, 8] and e2e["clip"]["audio"]
    assert e2e["libs"] == {"opencv": "ok", "av": "ok"} and e2e["batch"] == 2
    entry = e2e["backends"]["torch"]
    assert set(e2e["backends"]) == {"torch"}  # the baseline has no Engine path
    lat = run["backends"]["torch"]["latency"]["p50_ms"]
    assert entry["model_fps"] == pytest.approx(3 * 2 * 1e3 / lat)
    eo = entry["engine_only"]
    assert len(eo["raw_ms"]) == 1 and eo["fps"] == pytest.approx(3e3 / eo["latency"]["p50_ms"])
    for lib, encoder in (("opencv", "mp4v"), ("av", "libx264")):
        r = entry[lib]
        assert encoder in r["encoder"] and r["frames"] == 3
        for mode in ("serial", "pipelined"):
            assert len(r["raw_ms"][mode]) == 1 and r[mode]["p50_ms"] == r["raw_ms"][mode][0] > 0
            assert r[f"{mode}_fps"] == pytest.approx(3e3 / r[mode]["p50_ms"])
        assert r["pipelined_speedup"] == pytest.approx(r["serial"]["p50_ms"] / r["pipelined"]["p50_ms"])
    assert "end to end (decode + model + encode" in out and "pipelined fps" in out and "engine-only fps" in out
    assert not list(tmp_path.glob("*.mp4"))  # the clips live in a temp dir that is removed

    rc, _, err = _run(["--task", "toonify", "--res", "32", "--mode", "video", "--frames", "1", "--backends", "torch",
                       "--random-weights", "--width-div", "4", "--iters", "1", "--warmup", "0", "--no-end-to-end",
                       "--json", str(js)], capsys)
    assert rc == 0, err
    assert "end_to_end" not in json.loads(js.read_text())["runs"][0]

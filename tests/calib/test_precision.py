"""Measured precision plans on real (tiny, width_div=4) exports, evaluated on ONNX Runtime CPU
with FP16 storage emulated (calib.compare.emulate_fp16).

Bounds, stated once:
  TARGET_PSNR      the plan's FP16 graph vs FP32, worst sample (the issue's 40 dB)
  NAIVE_FAIL_PSNR  the naive FP16 graph of the overflow checkpoint must be below this (or non-finite)
  FP32_FLOP_BOUND  fraction of conv FLOPs (Conv/ConvTranspose/FusedModulatedConv2d) a plan for
                   random weights may leave in FP32 in the per-frame graph (synth / translate,
                   at the bucket shape): the FP32 islands must be the cheap parts
  STYLE_FLOP_BOUND the same for the style graph, which runs once per image or clip (fixed
                   256x256): the random-weight IR-SE encoder accumulates FP16 rounding over its
                   24 residual units, so its plan keeps the early units FP32 (measured 39%)
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

RES = 128  # the bucket of the fp32_export fixture (tests/conftest.py FP32_EXPORT_RES; x1 up to 32)
LATENT_SCALE = 1000.0  # latent_avg x this: w+ rows ~1e3, squared styles ~1e6 > FP16 max
TARGET_PSNR = 40.0
NAIVE_FAIL_PSNR = 20.0
FP32_FLOP_BOUND = 0.05
STYLE_FLOP_BOUND = 0.6
SAMPLES = 3

_results: dict = {}


def _calibrate(fp32_export, task, scale=1.0):
    key = (task, scale)
    if key not in _results:
        from calib.precision import calibrate_task

        _results[key] = calibrate_task(task, RES, artifacts=fp32_export(task, scale), samples=SAMPLES, seed=0)
    return _results[key]


def _row(report, graph_label, output="y"):
    rows = [r for r in report.rows if r["graph"] == graph_label and r["output"] == output]
    assert len(rows) == 1, (graph_label, [r["graph"] for r in report.rows])
    return rows[0]


def test_scaled_latent_avg_naive_fp16_fails_plan_holds(fp32_export):
    """latent_avg x1000: squared styles reach ~1e6, beyond FP16. The naive FP16 graph (no FP32
    islands, no vector rule) breaks; the calibrated plan is finite and >= 40 dB."""
    r = _calibrate(fp32_export, "sketch2face", LATENT_SCALE)
    info = r.infos["translate"]
    assert info["overflow_tensors"], "the range measurement must see the overflow risk"
    y = info["outputs"]["y"]
    assert y.finite and y.psnr >= TARGET_PSNR, (y.psnr, y.nan, y.inf)
    naive = _row(r.report, f"translate@{RES} naive fp16")
    naive_psnr = float(naive["psnr"])
    assert naive["nan"] + naive["inf"] > 0 or naive_psnr < NAIVE_FAIL_PSNR, naive
    print(f"\nsketch2face latent_avg x{LATENT_SCALE:g}: plan {y.psnr:.1f} dB, naive FP16 {naive_psnr:.1f} dB "
          f"(NaN {naive['nan']}, Inf {naive['inf']}), conv FLOPs in FP32 "
          f"{100 * info['flops']['fp32_fraction']:.2f}%")


@pytest.mark.parametrize(
    "task",
    [
        "superres",
        "sketch2face",
        pytest.param("edit", marks=pytest.mark.slow),
        pytest.param("toonify", marks=pytest.mark.slow),
        pytest.param("inversion", marks=pytest.mark.slow),
        pytest.param("mask2face", marks=pytest.mark.slow),
    ],
)
def test_random_weights_plan_meets_target_with_few_fp32_flops(fp32_export, task):
    r = _calibrate(fp32_export, task)
    for g, info in r.infos.items():
        flops = info["flops"]
        assert info["met"] and info["outputs"], g
        for name, m in info["outputs"].items():
            assert m.finite and m.psnr >= TARGET_PSNR, (task, g, name, m.psnr)
        assert flops["fp16"] + flops["fp32"] > 0
        assert flops["fp32_fraction"] <= (STYLE_FLOP_BOUND if g == "style" else FP32_FLOP_BOUND), (task, g, flops)
        print(f"\n{task}/{g}: PSNR {info['psnr']:.1f} dB, conv FLOPs FP32 {flops['fp32']:,} of "
              f"{flops['fp16'] + flops['fp32']:,} ({100 * flops['fp32_fraction']:.3f}%)")
    from export.fp16 import validate_plan

    validate_plan(r.plan, task)  # what sgex-export will accept
    assert r.plan["source"] == "calibrated" and r.plan["rules"] == {"io_fp32": True, "vectors_fp32": True}


def test_cli_plan_is_byte_identical_for_same_data_and_seed(fp32_export, tmp_path, capsys):
    """A fresh run through the CLI reproduces the library run byte for byte (no timestamp)."""
    from calib.cli import main
    from calib.precision import plan_json

    first = _calibrate(fp32_export, "sketch2face")
    out, rep = tmp_path / "plan.json", tmp_path / "report.md"
    rc = main(["--task", "sketch2face", "--res", str(RES), "--artifacts", fp32_export("sketch2face"),
               "--samples", str(SAMPLES), "--seed", "0", "--out", str(out), "--report", str(rep)])
    assert rc == 0, capsys.readouterr().err
    assert out.read_text() == plan_json(first.plan)
    md = rep.read_text()
    assert f"translate@{RES} calibrated" in md and "naive fp16" in md
    js = json.loads((tmp_path / "report.json").read_text())
    assert js["format"] == "sgex-accuracy-report" and {r["graph"] for r in js["rows"]} >= {f"translate@{RES} calibrated"}


def test_search_moves_layers_by_measured_error(fp32_export):
    """An unreachable target forces the search: it moves the units (layer scopes or lone nodes)
    with the largest measured error contribution, in rank order, deterministically."""
    import onnx

    from calib.data import graph_feeds, load_samples
    from calib.precision import GraphCalibrator, plan_graph

    d = fp32_export("sketch2face")
    model = onnx.load(f"{d}/{RES}/translate.onnx")
    names = [i.name for i in model.graph.input]
    feeds = [graph_feeds(names, s, style_dim=128) for s in load_samples("sketch2face", RES, None, 2, 0)]
    cal = GraphCalibrator("translate", model, feeds)
    plan_a, info_a = plan_graph(cal, target_psnr=500.0, max_steps=2)
    plan_b, info_b = plan_graph(cal, target_psnr=500.0, max_steps=2)
    assert plan_a == plan_b and info_a["greedy"] == info_b["greedy"]
    assert not info_a["met"] and info_a["steps"] == 2  # probes: top 1, top 2
    units = cal.units()
    chosen = [g["unit"] for g in info_a["greedy"]]
    assert len(set(chosen)) == 2 and all(u in units for u in chosen)
    assert all(s in chosen for s in plan_a["fp32_scopes"])
    contrib = [float(g["contribution"]) for g in info_a["greedy"]]
    assert contrib == sorted(contrib, reverse=True) and all(math.isfinite(c) and c > 0 for c in contrib)
    assert math.isfinite(info_a["psnr"])


@pytest.mark.slow
def test_fp16_export_with_the_plan_matches_fp32(fp32_export, tiny_ckpt, tmp_path):
    """The plan goes through sgex-export (export.onnx.export_task precision fp16) unchanged: its
    node names exist in the fresh export, and the exported FP16 graph meets the target against
    the FP32 export on the same inputs (calib.compare.compare_artifacts, Polygraphy runners)."""
    import onnx
    import torch

    from calib.compare import compare_artifacts
    from export.onnx import export_task

    r = _calibrate(fp32_export, "sketch2face", LATENT_SCALE)
    obj = torch.load(tiny_ckpt("sketch2face"), weights_only=True)
    obj["latent_avg"] = obj["latent_avg"] * LATENT_SCALE
    ckpt = tmp_path / "scaled.pt"
    torch.save(obj, ckpt)
    export_task("sketch2face", RES, ckpt=str(ckpt), out=str(tmp_path / "fp16"), precision="fp16", plan=r.plan,
                progress=False)
    g16 = onnx.load(str(tmp_path / "fp16" / "sketch2face" / str(RES) / "translate.onnx"))
    names = {n.name for n in g16.graph.node}
    missing = [n for n in r.plan["graphs"]["translate"]["fp32_nodes"] if n not in names]
    assert not missing, missing[:5]
    rep = compare_artifacts(str(tmp_path / "fp16" / "sketch2face"), fp32_export("sketch2face", LATENT_SCALE),
                            samples=SAMPLES, seed=0)
    row = _row(rep, f"translate@{RES}")
    assert row["nan"] == 0 and row["inf"] == 0 and float(row["psnr"]) >= TARGET_PSNR, row

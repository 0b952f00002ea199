"""OUTDIR/README.md from what bench/gpu/run.sh left in OUTDIR: the environment, every step's status
and time, the test results, the kernel, end-to-end and profile tables, the goals as measured
(reported, never asserted) and the exact commands.

    python3 -m bench.gpu.report OUTDIR [--smoke 0|1] [--res-means x1|output]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

GOAL_SPEEDUP, GOAL_FRAME_MS, GOAL_KERNEL = 15.0, 2.0, 1.3
SGEX_TORCH = ("torch", "torch-cudagraph", "torch-compile")


def _load(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _f(v, fmt=".2f", none="-"):
    return none if v is None else format(v, fmt)


def steps_table(outdir: Path) -> tuple[list[str], list[dict]]:
    p = outdir / "steps.tsv"
    if not p.is_file():
        return ["(no steps.tsv)"], []
    rows = list(csv.DictReader(p.open(), delimiter="\t"))
    lines = ["| step | status | seconds | limit s |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['limit_s']} |" for r in rows]
    return lines, rows


def tests_section(outdir: Path) -> list[str]:
    lines = []
    x = outdir / "logs" / "pytest.xml"
    if x.is_file():
        try:
            root = ET.parse(x).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            a = suite.attrib
            lines.append(f"{a.get('tests')} tests: {a.get('failures')} failed, {a.get('errors')} errors, "
                         f"{a.get('skipped')} skipped ({float(a.get('time', 0)):.0f} s).")
            bad = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                   if c.find("failure") is not None or c.find("error") is not None]
            lines += [f"- FAILED {b}" for b in bad[:40]]
        except ET.ParseError as e:
            lines.append(f"pytest.xml unreadable ({e})")
    else:
        lines.append("no pytest result (step a did not run to the end: see logs/a-pytest.log)")
    g = _load(outdir / "logs" / "gpu_tests.json") or {}
    for k, v in (g.get("fp16_vs_fp32") or {}).items():
        lines.append(f"- torch FP16 path vs FP32 ({k}, random weights): PSNR {v['psnr_ref_range_db']:.1f} dB over "
                     f"the FP32 output's range ({v['ref_range']:.3g}), {v['islands']} FP32 islands, max |diff| "
                     f"{v['max_abs_diff']:.3g}")
    kern = g.get("kernel") or {}
    for dt in ("fp32", "fp16"):
        errs = [(v["max_abs_err"] / v["ref_max"], k) for k, v in kern.items() if k.endswith("/" + dt) and v["ref_max"]]
        if errs:
            worst = max(errs)
            lines.append(f"- Triton kernel {dt.upper()} vs FP32 reference, {len(errs)} generator calls: worst "
                         f"max|diff|/max|ref| {worst[0]:.2e} ({worst[1].rsplit('/', 1)[0]})")
    return lines


def kernel_section(res: dict | None) -> tuple[list[str], dict]:
    if not res:
        return ["no kernel results (see logs/b-kernel.log)"], {}
    lines = ["| layer shape | B | official ms | best unfused ms | Triton ms | Triton TFLOP/s | vs unfused | "
             "vs official | Triton max err | unfused max err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    sp = []
    for r in res["results"]:
        im = r["impls"]
        best = r["unfused_best"]
        sp.append(r["speedup_vs_unfused_best"])
        lines.append(f"| {r['shape']} | {r['batch']} | {im['official']['median_ms']:.3f} | "
                     f"{im[best]['median_ms']:.3f} ({best.split('_', 1)[1]}) | {im['triton']['median_ms']:.3f} | "
                     f"{im['triton']['tflops_at_median']:.1f} | {r['speedup_vs_unfused_best']:.2f}x | "
                     f"{r['speedup_vs_official']:.2f}x | {im['triton']['max_abs_err_vs_fp32_reference']:.2e} | "
                     f"{im[best]['max_abs_err_vs_fp32_reference']:.2e} |")
    summary = {}
    if sp:
        summary = {"min": min(sp), "geomean": math.exp(sum(math.log(s) for s in sp) / len(sp)), "n": len(sp)}
    return lines, summary


def e2e_rows(outdir: Path) -> tuple[list[str], list[dict]]:
    lines = ["| task | mode | batch | output | backend | prec | p50 ms / call | ms / frame | speedup | "
             "TFLOP/s | peak MB | rel diff | PSNR dB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    flat = []
    for p in sorted(outdir.glob("*.json")):
        r = _load(p)
        if not r or r.get("format") != "sgex-bench":
            continue
        cfg = r["config"]
        for run in r["runs"]:
            frames = run["frames"]
            for name, b in run["backends"].items():
                per_frame = b["latency"]["p50_ms"] / frames / run["batch"] if cfg["mode"] == "video" else None
                acc = b.get("accuracy", {})
                row = dict(file=p.name, task=cfg["task"], mode=cfg["mode"], batch=run["batch"],
                           output=run["output_shape"][2], backend=name, precision=b["precision"],
                           p50=b["latency"]["p50_ms"], per_frame=per_frame,
                           speedup=b.get("speedup_vs_baseline"), tflops=b["achieved_tflops"],
                           peak_mb=b["memory"]["peak_mb"], rel=acc.get("rel_max_abs_diff"),
                           psnr=acc.get("psnr_db"), finite=acc.get("finite"))
                flat.append(row)
                lines.append(
                    f"| {row['task']} | {row['mode']} | {row['batch']} | {row['output']} | {name} | "
                    f"{row['precision']} | {row['p50']:.2f} | {_f(per_frame)} | {_f(row['speedup'])}x | "
                    f"{row['tflops']:.2f} | {row['peak_mb']:.0f} | "
                    f"{'baseline' if name == 'torch-official' else _f(row['rel'], '.1e')} | "
                    f"{'-' if name == 'torch-official' else _f(row['psnr'], '.1f')} |")
    if not flat:
        lines = ["no end-to-end results (see logs/c-*.log)"]
    return lines, flat


def goals(flat: list[dict], kernel: dict, smoke: bool) -> list[str]:
    out = []
    if smoke:
        return ["CPU smoke run: no goal is evaluated (nothing here is a GPU measurement)."]
    cand = [r for r in flat if r["task"] == "superres" and r["mode"] == "video" and r["batch"] == 1
            and r["output"] == 1024 and r["backend"] in SGEX_TORCH and r["speedup"] is not None]
    if cand:
        best = max(cand, key=lambda r: r["speedup"])
        ok = best["speedup"] >= GOAL_SPEEDUP and best["per_frame"] <= GOAL_FRAME_MS
        out.append(f"- superres, output 1024, batch 1, video: fastest sgex path {best['backend']} at "
                   f"{best['speedup']:.1f}x the baseline and {best['per_frame']:.2f} ms per frame (goal: >= "
                   f"{GOAL_SPEEDUP:g}x and <= {GOAL_FRAME_MS:g} ms): {'met' if ok else 'NOT met'}.")
    else:
        out.append("- superres, output 1024, batch 1, video: not measured (step c did not produce it).")
    if kernel:
        ok = kernel["min"] >= GOAL_KERNEL
        out.append(f"- fused kernel vs best unfused PyTorch FP16 (cuDNN) over {kernel['n']} generator layer "
                   f"shapes x batches: min {kernel['min']:.2f}x, geometric mean {kernel['geomean']:.2f}x (goal: >= "
                   f"{GOAL_KERNEL:g}x at every shape, same accuracy): {'met' if ok else 'NOT met'}.")
    else:
        out.append("- fused kernel vs unfused: not measured (step b did not produce it).")
    return out


def write_report(outdir: Path, smoke: bool, res_means: str) -> str:
    env = _load(outdir / "environment.json") or {}
    where = env.get("gpu") or "CPU"
    steps, step_rows = steps_table(outdir)
    kern_lines, kern_summary = kernel_section(_load(outdir / "kernel.json"))
    e2e_lines, flat = e2e_rows(outdir)
    prof = _load(outdir / "profile.json")
    L = [f"# sgex GPU run: {where}", ""]
    if smoke:
        L += ["**CPU SMOKE RUN** (`bench/gpu/run.sh --cpu-smoke`): every step at tiny sizes on CPU with the "
              "Triton kernel interpreted. It proves the script runs; **no number below is a measurement** of "
              "anything but this smoke run.", ""]
    L += ["Written by `bench/gpu/report.py` from what `bash bench/gpu/run.sh` left in this folder. Random "
          "weights (`--random-weights`, full width except in the smoke run): outputs are noise, timings are "
          "those of the real network sizes; accuracy is against the FP32 baseline on the same inputs.", "",
          "## Machine", "", "```", json.dumps(env, indent=1), "```", "",
          "## Steps", "", *steps, "",
          "## Goals (reported, not asserted)", "", *goals(flat, kern_summary, smoke), "",
          "## a. GPU tests (`pytest -m 'gpu and not slow'`)", "", *tests_section(outdir), "",
          "## b. Fused kernel vs official grouped conv vs best unfused cuDNN formulation", "",
          "FP16 feature maps, every 3x3 layer shape of the generator at the run's outputs (read off the model), "
          "CUDA-event medians. TFLOP/s = 2*B*Cout*H*W*Cin*9 / median.", "", *kern_lines, "",
          "## c. End to end: sgex-bench", "",
          "One call = style + synth of a batch (image) or a clip (video; sgex computes the style once per clip, "
          "the baseline per frame). ms / frame = clip p50 / frames / batch. speedup = baseline p50 / p50 in the "
          "same run. TFLOP/s counts sgex's useful work.", "", *e2e_lines, "",
          "## d. Profile of the torch path by layer group", ""]
    if prof:
        from bench.gpu.profile import format_table

        L += [format_table(prof), "",
              f"Ceilings measured on this device: {json.dumps(prof.get('ceilings_measured'))}; datasheet: "
              f"{json.dumps(prof.get('datasheet'))}; ridge point {_f(prof.get('ridge_flop_per_byte'), '.0f')} "
              f"FLOP/byte. Time field: {prof.get('time_field')}. The eager path is profiled (CUDA graphs "
              f"replay the same kernels without launch gaps but carry no per-group annotations)."]
    else:
        L.append("no profile (see logs/d-profile.log)")
    L += ["", "## Exact commands", "",
          f"Run from the repository root with `PYTHONPATH=.`; sizes are output sides, passed to sgex-bench's "
          f"`--res` as the {'x1 side (output / 4)' if res_means == 'x1' else 'output side'}.", "", "```",
          "bash bench/gpu/run.sh" + (" --cpu-smoke" if smoke else "") + " OUTDIR"]
    L += [r["command"].strip() for r in step_rows]
    L += ["```", "", "Logs of every step are in `logs/`; the JSON files hold every raw timing.", ""]
    text = "\n".join(L)
    from runtime.manifest import atomic_write_text

    atomic_write_text(outdir / "README.md", text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu.report", description=__doc__.split("\n\n")[0],
                                 epilog="example: python3 -m bench.gpu.report /tmp/gpu")
    ap.add_argument("outdir")
    ap.add_argument("--smoke", type=int, choices=(0, 1), default=0)
    ap.add_argument("--res-means", choices=("x1", "output"), default="output")
    args = ap.parse_args(argv)
    d = Path(args.outdir)
    if not d.is_dir():
        print(f"bench.gpu.report: {d} is not a directory", file=sys.stderr)
        return 2
    write_report(d, bool(args.smoke), args.res_means)
    print(f"wrote {d / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

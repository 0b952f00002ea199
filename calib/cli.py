"""sgex-calib: measured FP16 precision plans and accuracy reports.

Thin CLI: parses, then calls calib.precision.calibrate_task (plan) or
calib.compare.compare_artifacts (report on two exported directories).
"""

from __future__ import annotations

import argparse
import os
import sys

from runtime._cli import run_main, setup_logging
from runtime.tasks import TASKS

PROG = "sgex-calib"

EXAMPLES = """\
examples:
  # plan for the superres checkpoint at bucket 1024 (outputs up to 1024, x1 up to 256) from a
  # folder of face crops, with a report
  sgex-calib --task superres --res 1024 --data faces/ --ckpt styleganex_sr.pt \\
      --out plans/superres.json --report plans/superres.md

  # plan from 16 frames of a clip (frames spread over the video), stricter headroom
  sgex-calib --task edit --res 1024 --data clip.mp4 --ckpt styleganex_edit_hair.pt \\
      --out hair.json --samples 16 --headroom 16

  # no data, random weights (a smoke test of the pipeline; the plan is for noise)
  sgex-calib --task sketch2face --res 256 --random-weights --width-div 4 --out plan.json

  # calibrate an FP32 export you already have (no re-export)
  sgex-calib --task superres --res 1024 --artifacts artifacts/superres --out plan.json

  # then export FP16 with the plan
  sgex-export --task superres --res 1024 --ckpt styleganex_sr.pt --precision fp16 --plan plans/superres.json

  # OpenVINO BF16 gate of an FP32 export: BF16 vs FP32 per output and bucket, FP32 islands where
  # needed, recorded in the export's manifest (the openvino backend's precision bf16 needs it)
  sgex-calib --bf16 --artifacts artifacts/superres --data faces/ --report bf16.md

  # accuracy of an FP16 export against the FP32 export of the same checkpoint
  sgex-calib --compare artifacts-fp16/superres --reference artifacts/superres --report fp16.md

The plan keeps graph I/O and every vector node (the modulation/demodulation chain) FP32, pins
every node that reads or writes a tensor whose measured max |x| times --headroom reaches the FP16
maximum 65504, then moves whole layers to FP32, largest measured error first, until the FP16
graph reaches --target-psnr against FP32 on the calibration set. The same inputs and --seed give
a byte-identical plan. Bad calibration data (empty folder, unreadable file, video without frames)
is one error line and exit status 2.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Measure activation ranges and FP16 error of a task's graphs and write a "
        "precision plan (which nodes stay FP32) for sgex-export --precision fp16.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", choices=list(TASKS), help="task to calibrate")
    p.add_argument("--res", type=int, help="bucket the graphs are calibrated at: its OUTPUT side, a multiple "
                   "of 32 (inputs are x1 up to res/4, multiples of 8)")
    p.add_argument("--data", metavar="DIR|VIDEO|IMAGE",
                   help="calibration inputs: a folder of images, a video or one image "
                   "(default: seeded synthetic inputs); mask2face reads label maps (values 0..18)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", metavar="FILE", help="official StyleGANEX checkpoint (.pt)")
    src.add_argument("--random-weights", action="store_true", help="random weights (tests and demos)")
    src.add_argument("--artifacts", metavar="DIR",
                     help="calibrate an existing FP32 portable export (its task directory) instead of exporting")
    p.add_argument("--width-div", type=int, default=1,
                   help="channel divisor of --random-weights models (4 = the tiny test model; default 1)")
    p.add_argument("--out", metavar="PLAN.json", help="where to write the precision plan")
    p.add_argument("--report", metavar="REPORT.md",
                   help="also write the accuracy report as markdown here and as JSON next to it (.json)")
    p.add_argument("--samples", type=int, default=8, help="number of calibration inputs (default 8)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of synthetic inputs, noise maps and z (sample i uses seed+i; default 0)")
    p.add_argument("--target-psnr", type=float, default=40.0,
                   help="PSNR (dB, worst sample, vs FP32) the FP16 graph must reach (default 40)")
    p.add_argument("--headroom", type=float, default=4.0,
                   help="a tensor whose max |x| times this reaches 65504 stays FP32 (default 4)")
    p.add_argument("--max-mib", type=int, default=1024,
                   help="memory bound for intermediate activations per pass, MiB (default 1024)")
    p.add_argument("--bf16", action="store_true",
                   help="gate mode: measure OpenVINO BF16 against FP32 on --artifacts (every bucket), keep "
                   "layers FP32 where --target-psnr is missed, and record the result in its manifest")
    p.add_argument("--threads", type=int, help="CPU threads for --bf16 (default: the process's CPU set)")
    p.add_argument("--compare", metavar="DIR",
                   help="report mode: compare this exported task directory against --reference")
    p.add_argument("--reference", metavar="DIR", help="FP32 exported task directory for --compare")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _report_paths(report: str) -> tuple[str, str]:
    root, ext = os.path.splitext(report)
    return (report if ext.lower() == ".md" else root + ".md"), root + ".json"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_main(PROG, lambda: _run(args))


def _run(args) -> int:
    from runtime.errors import SgexError

    if args.compare:
        if not args.reference:
            raise SgexError("--compare needs --reference DIR (the FP32 export)")
        if not args.report:
            raise SgexError("--compare needs --report REPORT.md")
        from calib.compare import compare_artifacts, write_report

        report = compare_artifacts(args.compare, args.reference, data=args.data, samples=args.samples, seed=args.seed)
        md, js = _report_paths(args.report)
        write_report(report, js, md)
        sys.stdout.write(report.to_markdown())
        return 0
    if args.bf16:
        return _run_bf16(args)
    for flag, val in (("--task", args.task), ("--res", args.res), ("--out", args.out)):
        if val is None:
            raise SgexError(f"{flag} is required (see {PROG} --help)")
    if not args.ckpt and not args.random_weights and not args.artifacts:
        raise SgexError("give a checkpoint (--ckpt FILE), --random-weights or an FP32 export (--artifacts DIR)")
    if args.samples < 1:
        raise SgexError(f"--samples must be >= 1, got {args.samples}")
    from calib.precision import calibrate_task, plan_json
    from runtime.manifest import atomic_write_text

    bar = _Bar()
    try:
        result = calibrate_task(
            args.task, args.res, ckpt=args.ckpt, random_weights=args.random_weights, data=args.data,
            samples=args.samples, seed=args.seed, target_psnr=args.target_psnr, headroom=args.headroom,
            width_div=args.width_div, max_bytes=args.max_mib << 20, artifacts=args.artifacts,
            progress=bar.update, stage=bar.stage,
        )
    finally:
        bar.close()
    atomic_write_text(args.out, plan_json(result.plan))
    if args.report:
        md, js = _report_paths(args.report)
        from calib.compare import write_report

        write_report(result.report, js, md)
    sys.stdout.write(result.report.to_markdown())
    print(f"plan: {args.out}")
    unmet = [g for g, i in result.infos.items() if not i["met"]]
    if unmet:
        raise SgexError(f"target PSNR {args.target_psnr:g} dB not reached for {', '.join(unmet)} "
                        f"(plan written anyway: {args.out}); see --report")
    return 0


def _run_bf16(args) -> int:
    from runtime.errors import SgexError

    if not args.artifacts:
        raise SgexError("--bf16 needs --artifacts DIR (an fp32 portable export's task directory)")
    if args.samples < 1:
        raise SgexError(f"--samples must be >= 1, got {args.samples}")
    if args.threads is not None and args.threads < 1:
        raise SgexError(f"--threads must be >= 1, got {args.threads}")
    from calib.bf16 import gate_artifacts, write_gate
    from calib.compare import write_report
    from runtime.engine import _task_dir

    task_dir = _task_dir(args.artifacts, args.task)
    bar = _Bar()
    try:
        record, report = gate_artifacts(task_dir, data=args.data, samples=args.samples, seed=args.seed,
                                        target_psnr=args.target_psnr, threads=args.threads,
                                        progress=bar.update, stage=bar.stage)
    finally:
        bar.close()
    path = write_gate(task_dir, record)
    if args.report:
        md, js = _report_paths(args.report)
        write_report(report, js, md)
    sys.stdout.write(report.to_markdown())
    print(f"bf16 gate {'PASSED' if record['passed'] else 'FAILED'}: recorded in {path}")
    if not record["passed"]:
        failed = [k for k, r in record["graphs"].items() if not r["passed"]]
        raise SgexError(f"BF16 misses {args.target_psnr:g} dB on {', '.join(failed)} even with every layer "
                        f"FP32-pinned that OpenVINO can pin (recorded as failed); use precision fp32")
    return 0


class _Bar:
    """tqdm bar over graph runs (one tick per sample run), its description = the current stage;
    tqdm hides itself when stderr is not a terminal."""

    def __init__(self):
        from tqdm import tqdm

        self._bar = tqdm(total=None, unit="run", desc=PROG, disable=None, file=sys.stderr, leave=False)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def stage(self, text: str) -> None:
        self._bar.set_description_str(text)
        if self._bar.disable:
            import logging

            logging.getLogger("calib").info("%s", text)

    def close(self) -> None:
        self._bar.close()


if __name__ == "__main__":
    raise SystemExit(main())

"""sgex-export: export one StyleGANEX task to per-bucket ONNX graphs with a manifest.

Thin CLI: parse, then one call to export.onnx.export_task (torch/onnx are imported there, so
--help needs neither). A user error exits 2 with one line on stderr and writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.engine import add_engine_args, maybe_build  # tensorrt is imported only when building
from export.onnx import DEFAULT_OPSET  # export.onnx imports torch/onnx only inside functions
from runtime._cli import Parser, run_main, setup_logging
from runtime.buckets import DEFAULT_MAX_BATCH, MAX_SIDE, check_side
from runtime.errors import SgexError, require
from runtime.tasks import TASKS

PROG = "sgex-export"
EXPORT_NEEDS = (("torch", "torch", "PyTorch"), ("onnx", "onnx", "ONNX"),
                ("onnxscript", "onnx", "onnxscript (the dynamo ONNX exporter)"))

EPILOG = f"""\
examples:
  # superres, outputs up to 1024x1024 (x1 up to 256: the paper's 32x32 LR -> 1024), FP32
  sgex-export --task superres --res 1024 --ckpt pretrained_models/styleganex_sr.pt --out artifacts
  # add the 2048 bucket (x1 up to 512, every official face crop) to the same directory
  sgex-export --task superres --res 2048 --ckpt pretrained_models/styleganex_sr.pt --out artifacts
  # FP16 graph for TensorRT with the default precision plan, or a calibrated one (sgex-calib)
  sgex-export --task toonify --variant pixar --res 2048 --ckpt styleganex_toonify_pixar.pt --precision fp16
  sgex-export --task toonify --res 2048 --ckpt styleganex_toonify_pixar.pt --precision fp16 --plan plan.json
  # fused modulated conv as one custom node (TensorRT plugin / onnxruntime-extensions)
  sgex-export --task edit --variant age --res 2048 --ckpt styleganex_edit_age.pt --flavor plugin
  # FP16 ONNX plus TensorRT engines (needs TensorRT >= 10.9 and an NVIDIA GPU; explicit flag,
  # never automatic: without TensorRT, --engine stops with the install command)
  sgex-export --task superres --res 1024 --ckpt styleganex_sr.pt --precision fp16 --engine
  # random weights (the outputs are noise: a smoke test of the pipeline)
  sgex-export --task sketch2face --res 1024 --random-weights --out /tmp/artifacts

tasks: {", ".join(TASKS)}
layout: <out>/<task>/manifest.json, style/style.onnx (RGB tasks), <res>/synth.onnx or
<res>/translate.onnx, editing_w.npy (edit). --res is the OUTPUT side of the bucket (a multiple
of 32); its graphs take batch 1..--max-batch and any x1 (sketch, mask) whose height and width are
multiples of 8 from 8 up to --res/4, at exactly that size (output 4x). Default ladder:
512, 1024, 1536, 2048 (the official crop is at most 512x512, output 2048). Exporting another
--res into the same directory adds a bucket (same checkpoint, precision and flavor required).
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1], epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, metavar="TASK", help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--res", type=int, required=True, metavar="N",
                   help=f"bucket: the largest OUTPUT side, a multiple of 32 (x1 up to N/4), up to {MAX_SIDE}, "
                        "e.g. 512, 1024, 2048")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", metavar="FILE", help="official StyleGANEX checkpoint (.pt)")
    src.add_argument("--random-weights", action="store_true",
                     help="random weights in the official format (outputs are noise)")
    p.add_argument("--out", default="artifacts", metavar="DIR", help="output root (default: artifacts)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"],
                   help="fp16 keeps the precision plan's FP32 islands (default: fp32)")
    p.add_argument("--plan", metavar="FILE", help="precision plan JSON (fp16; default: built-in plan)")
    p.add_argument("--flavor", default="portable", choices=["portable", "plugin"],
                   help="portable: standard ONNX ops; plugin: fused modulated conv custom node")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help=f"largest batch of the bucket (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N",
                   help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-weights (default 0)")
    p.add_argument("--variant", metavar="V", help="checkpoint variant label (e.g. sr32, age, pixar)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_engine_args(p)
    return p


def run(args: argparse.Namespace) -> Path:
    """Validate what needs no heavy import, then export. Returns the manifest path."""
    if args.task not in TASKS:
        raise SgexError(f"unknown task {args.task!r} (choose from: {', '.join(TASKS)})")
    if not args.ckpt and not args.random_weights:
        raise SgexError("give --ckpt FILE (an official checkpoint) or --random-weights")
    try:
        check_side(args.res)
    except ValueError as e:
        raise SgexError(str(e)) from None
    if args.seed < 0:
        raise SgexError(f"--seed must be an integer >= 0, got {args.seed}")
    for module, extra, what in EXPORT_NEEDS:  # one line naming the extra, not an ImportError
        require(module, extra, what)
    if getattr(args, "engine", False):  # before minutes of ONNX export, not after
        from runtime.backends.trt import import_tensorrt

        import_tensorrt()
    from export.onnx import check_args, export_task

    check_args(args.task, args.res, args.precision, args.flavor, args.max_batch, args.opset, args.ckpt,
               args.random_weights, args.variant)
    if args.plan is not None and args.precision != "fp16":
        raise SgexError("--plan only applies to --precision fp16")
    if args.plan is not None and not Path(args.plan).is_file():
        raise SgexError(f"--plan {args.plan}: the file does not exist")
    if args.random_weights:
        print(f"{PROG}: WARNING: --random-weights: exporting RANDOM weights (seed {args.seed}); every "
              f"output of these graphs is noise", file=sys.stderr)
    path = export_task(
        args.task, args.res, ckpt=args.ckpt, random_weights=args.random_weights, out=args.out,
        precision=args.precision, plan=args.plan, flavor=args.flavor, max_batch=args.max_batch,
        opset=args.opset, seed=args.seed, variant=args.variant, progress=not args.quiet)
    maybe_build(args, path.parent)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING if args.quiet else logging.INFO)

    def body() -> int:
        path = run(args)
        print(path)
        return 0

    return run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())

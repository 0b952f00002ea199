"""The kernel microbenchmark (kernels/bench.py) at every 3x3 layer shape the generator runs for the
given output sizes, read off the model (bench/gpu/shapes.py), not off a second table.

    python3 -m bench.gpu.kernel_bench --outputs 1024 2048 --batch 1 4 --out kernel.json
    TRITON_INTERPRET=1 python3 -m bench.gpu.kernel_bench --device cpu --width-div 4 --outputs 32 ...

Per layer shape and batch: the official grouped conv, the best unfused PyTorch formulation (cuDNN,
NCHW or channels_last) and the fused Triton op: ms and TFLOP/s (kernels.bench.run). `--device cpu`
is the harness smoke test under the Triton interpreter, never a measurement.
"""

from __future__ import annotations

import argparse
import os
import sys


def generator_shapes(outputs, width_div: int = 1) -> list[tuple[str, int, int, int]]:
    from bench.gpu.shapes import bench_shapes, modconv_calls
    from export.networks import ModelConfig
    from runtime.tasks import OUTPUT_SCALE

    cfg = ModelConfig(width_div=width_div)
    return bench_shapes([c for out in outputs for c in modconv_calls(cfg, out // OUTPUT_SCALE, noise=True)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu.kernel_bench",
                                 description=__doc__.split("\n\n")[0],
                                 epilog="example: python3 -m bench.gpu.kernel_bench --outputs 1024 2048 "
                                        "--batch 1 4 --out kernel.json",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", type=int, nargs="+", default=[1024, 2048],
                    help="output sides (multiples of 32; the generator's layers for each)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--max-channels", type=int, default=None,
                    help="keep only layers with at most this many channels (the CPU smoke test)")
    ap.add_argument("--width-div", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", required=True, help="JSON results file (written atomically)")
    args = ap.parse_args(argv)
    for o in args.outputs:
        if o <= 0 or o % 32:
            print(f"bench.gpu.kernel_bench: --outputs {o}: must be a positive multiple of 32", file=sys.stderr)
            return 2
    try:
        import torch
    except ImportError:
        print("bench.gpu.kernel_bench: needs PyTorch (pip install -c constraints.txt 'sgex[torch,triton]')",
              file=sys.stderr)
        return 2
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.device == "cuda" and (interp or not torch.cuda.is_available()):
        print("bench.gpu.kernel_bench: --device cuda needs a CUDA GPU and TRITON_INTERPRET unset",
              file=sys.stderr)
        return 2
    if args.device == "cpu" and not interp:
        print("bench.gpu.kernel_bench: --device cpu needs TRITON_INTERPRET=1 (a harness smoke test)",
              file=sys.stderr)
        return 2
    from kernels import bench as kb

    shapes = [s for s in generator_shapes(args.outputs, args.width_div)
              if args.max_channels is None or s[1] <= args.max_channels]
    result = kb.run(args.batch, args.dtype, args.warmup, args.iters, shapes, args.device)
    result["outputs"] = args.outputs
    result["argv"] = ["python3", "-m", "bench.gpu.kernel_bench", *(argv if argv is not None else sys.argv[1:])]
    kb._write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU microbenchmark of the fused modulated convolution at the StyleGANEX generator's shapes.

    python -m kernels.bench --out modconv_bench.json [--batch 1 4] [--dtype fp16] [--iters 100]

Per layer shape it times, with CUDA events around each call (after warm-up; the Triton
autotuner runs during warm-up):

  official   StyleGAN2's formulation as the research code runs it: per-sample weights
             weight * style (demodulated), one grouped conv2d with groups = B over the batch
             folded into channels, then noise, bias and leaky ReLU * sqrt(2) as separate ops
  unfused    the best plain-PyTorch order: x * style -> cuDNN conv2d (shared weight) -> * demod ->
             epilogue; timed in NCHW and in channels_last, the faster one is "unfused_best"
  triton     kernels.modconv_triton (one launch, modulation/demod/epilogue fused)

Shapes (Cin = Cout, 3x3, B from --batch): the shallow dilated layers at F = 32 and 64 with 512
channels and dilations 8/4/2/1 (F is the fused feature side: 32 for a 256 input), and the later
layers 128 ch at 256^2, 64 ch at 512^2, 32 ch at 1024^2. Reported per implementation: median, p90,
p99, mean (ms), TFLOP/s at the median (2*B*Cout*Ho*Wo*Cin*k*k), and the max abs difference to the
FP32 reference. The JSON also records the GPU, driver/CUDA, torch, triton and cuDNN versions and
the command line. Needs a CUDA GPU; on a machine without one it prints one line and exits 2.

`--device cpu` runs the same harness on CPU tensors with the kernel under TRITON_INTERPRET=1 and
host timers: a smoke test of the harness (bench/gpu/run.sh --cpu-smoke), never a measurement; the
JSON says so ("interpreted": true).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time

__all__ = ["main", "SHAPES", "run"]

# (name, channels, side, dilation)
SHAPES = (
    [(f"F{f}-c512-d{d}", 512, f, d) for f in (32, 64) for d in (8, 4, 2, 1)]
    + [("c128-256", 128, 256, 1), ("c64-512", 64, 512, 1), ("c32-1024", 32, 1024, 1)]
)


def _percentile(sorted_ms: list[float], q: float) -> float:
    i = min(len(sorted_ms) - 1, max(0, math.ceil(q * len(sorted_ms)) - 1))
    return sorted_ms[i]


def _time(fn, warmup: int, iters: int, device: str = "cuda") -> dict:
    import torch

    if device == "cpu":
        for _ in range(warmup):
            fn()
        ms = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ms.append((time.perf_counter() - t0) * 1e3)
        ms.sort()
        return {"median_ms": _percentile(ms, 0.5), "p90_ms": _percentile(ms, 0.9),
                "p99_ms": _percentile(ms, 0.99), "mean_ms": sum(ms) / len(ms), "iters": iters}
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return {"median_ms": _percentile(ms, 0.5), "p90_ms": _percentile(ms, 0.9),
            "p99_ms": _percentile(ms, 0.99), "mean_ms": sum(ms) / len(ms), "iters": iters}


def _official(x, weight, style, noise, ns, bias):
    """Grouped-conv StyleGAN2 modulated conv (groups = B), then the epilogue as separate ops (the
    official FusedLeakyReLU CUDA extension is not built here). Per-sample weights are formed inside
    the timed call, as in every forward of the research code."""
    import torch
    import torch.nn.functional as F

    from kernels.modconv import DEMOD_EPS, LRELU_GAIN, LRELU_SLOPE

    b, cin, h, w = x.shape
    cout, _, k, _ = weight.shape

    def call(d, p):
        wb = weight[None] * style[:, None, :, None, None]                 # [B, Cout, Cin, k, k]
        demod = torch.rsqrt(wb.float().square().sum(dim=(2, 3, 4)) + DEMOD_EPS).to(wb.dtype)
        wb = wb * demod[:, :, None, None, None]
        y = F.conv2d(x.reshape(1, b * cin, h, w), wb.reshape(b * cout, cin, k, k), padding=p,
                     dilation=d, groups=b).reshape(b, cout, h, w)
        return F.leaky_relu(y + ns * noise + bias[None, :, None, None], LRELU_SLOPE) * LRELU_GAIN

    return call


def _unfused(x, weight, style, noise, ns, bias, channels_last: bool):
    """x * style -> cuDNN conv with the shared weight -> * demod -> epilogue, all inside the call."""
    import torch
    import torch.nn.functional as F

    from kernels.modconv import LRELU_GAIN, LRELU_SLOPE, demodulation

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    weight = weight.contiguous(memory_format=fmt)

    def call(d, p):
        demod = demodulation(weight.float(), style).to(x.dtype)[:, :, None, None]
        y = F.conv2d(x * style.to(x.dtype)[:, :, None, None], weight, padding=p, dilation=d)
        return F.leaky_relu(y * demod + ns * noise + bias[None, :, None, None], LRELU_SLOPE) * LRELU_GAIN

    return call


def run(batches=(1,), dtype: str = "fp16", warmup: int = 20, iters: int = 100, shapes=SHAPES,
        device: str = "cuda") -> dict:
    """Measure every shape x batch; returns the JSON-able result dict. device "cpu" only under
    TRITON_INTERPRET=1 (a harness smoke test, not a measurement)."""
    import torch

    from kernels.modconv import modulated_conv2d_reference
    from kernels.modconv_triton import modulated_conv2d_triton

    dt = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    dev = torch.device(device)
    torch.backends.cudnn.benchmark = True
    results = []
    for b in batches:
        for name, c, side, d in shapes:
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(b, c, side, side, generator=g).to(dev, dt)
            weight = (torch.randn(c, c, 3, 3, generator=g) / math.sqrt(9 * c)).to(dev, dt)
            style = (torch.randn(b, c, generator=g) + 1).to(dev, torch.float32)
            noise = torch.randn(b, 1, side, side, generator=g).to(dev, dt)
            bias = torch.randn(c, generator=g).to(dev, dt)
            ns = torch.tensor([0.1], device=dev, dtype=dt)
            ref = modulated_conv2d_reference(x.float(), weight.float(), style, dilation=d, padding=d,
                                             noise=noise.float(), noise_strength=ns.float(), bias=bias.float())
            impls = {
                "official": _official(x, weight, style.to(dt), noise, ns, bias),
                "unfused_nchw": _unfused(x, weight, style, noise, ns, bias, channels_last=False),
                "unfused_channels_last": _unfused(x, weight, style, noise, ns, bias, channels_last=True),
                "triton": lambda d, p: modulated_conv2d_triton(
                    x, weight, style, dilation=d, padding=p, noise=noise, noise_strength=ns, bias=bias),
            }
            flops = 2.0 * b * c * side * side * c * 9
            row = {"shape": name, "batch": b, "channels": c, "side": side, "dilation": d,
                   "dtype": dtype, "gflop": flops / 1e9, "impls": {}}
            with torch.no_grad():
                for iname, f in impls.items():
                    call = (lambda f=f: f(d, d))
                    err = (call().float() - ref).abs().max().item()
                    t = _time(call, warmup, iters, device)
                    t["tflops_at_median"] = flops / (t["median_ms"] * 1e-3) / 1e12
                    t["max_abs_err_vs_fp32_reference"] = err
                    row["impls"][iname] = t
            best = min(("unfused_nchw", "unfused_channels_last"), key=lambda k: row["impls"][k]["median_ms"])
            row["unfused_best"] = best
            tri = row["impls"]["triton"]["median_ms"]
            row["speedup_vs_official"] = row["impls"]["official"]["median_ms"] / tri
            row["speedup_vs_unfused_best"] = row["impls"][best]["median_ms"] / tri
            results.append(row)
            print(f"{name:16s} B={b} official {row['impls']['official']['median_ms']:.3f} ms  "
                  f"unfused({best.split('_', 1)[1]}) {row['impls'][best]['median_ms']:.3f} ms  "
                  f"triton {tri:.3f} ms  (x{row['speedup_vs_unfused_best']:.2f} vs unfused)", flush=True)
            del x, weight, noise, ref, impls
            if device == "cuda":
                torch.cuda.empty_cache()
    return {"format": "sgex-kernel-bench", "version": 1, "machine": _machine(device), "dtype": dtype,
            "warmup": warmup, "iters": iters, "interpreted": device == "cpu",
            "timer": "cuda-events" if device == "cuda" else "perf_counter (Triton interpreter)",
            "results": results}


def _machine(device: str = "cuda") -> dict:
    import torch
    import triton

    gpu = {"gpu": None}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        gpu = {"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}",
               "memory_gib": round(p.total_memory / 2**30, 1), "sm_count": p.multi_processor_count}
    return {**gpu,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "host": platform.node(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv}


def _write_json(path: str, obj: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".bench-", suffix=".json", dir=d)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="modconv_bench.json", help="JSON results file (written atomically)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--shapes", nargs="+", choices=[s[0] for s in SHAPES], help="subset of shapes")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: harness smoke test under TRITON_INTERPRET=1 (no measurement)")
    args = ap.parse_args(argv)
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.device == "cpu" and not interp:
        print("kernels.bench: --device cpu needs TRITON_INTERPRET=1 (a smoke test of the harness)",
              file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError:
        print("kernels.bench: needs PyTorch with CUDA (pip install -c constraints.txt 'sgex[torch,triton]')",
              file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kernels.bench: needs a CUDA GPU and none is available; nothing was measured", file=sys.stderr)
        return 2
    if args.device == "cuda" and interp:
        print("kernels.bench: TRITON_INTERPRET is set; unset it to time the compiled kernel", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("kernels.bench: needs Triton (pip install -c constraints.txt 'sgex[triton]')", file=sys.stderr)
        return 2
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes]
    result = run(args.batch, args.dtype, args.warmup, args.iters, shapes, args.device)
    _write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

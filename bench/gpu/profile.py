"""Where the time of one synth call goes, by layer group, with torch.profiler.

    python3 -m bench.gpu.profile --task superres --output 1024 --batch 1 --json profile.json

Groups (derived from the model, not a table of indices):
  encoder      the x1 encoder pass up to the fused feature f (encoder.taps + first_feature)
  shallow      the generator layers at the feature side F = H/8: conv1, to_rgb1 and every block
               before the first stride-2 up-conv (the dilated layers of StyleGANEX)
  high-res     every generator block from the first stride-2 up-conv on (2F .. 32F)
  fusion       the encoder-to-generator skip fusion layers (encoder.fusion.*)
Everything else in the call (w+ arithmetic, glue ops) is "other".

Time: each group's modules run inside torch.profiler.record_function("sgex::<group>"); a group's
time is the device (CUDA) time of the kernels launched inside it (`device_time_total` of the
annotation), its share is over the device time of every kernel of the profiled calls. On CPU the
same with CPU time (the smoke test of this script). The path profiled is sgex's torch path in
eager mode (FP16, FP32 islands, fused Triton op on CUDA): CUDA graphs replay the same kernels
without the launch gaps and cannot carry per-group annotations, so the shares hold for them too
while the total does not.

Work: FLOPs and the fewest bytes each group must move, counted once on a meta-device copy (no
arithmetic): a fused modulated conv reads x, the weight and the noise once and writes y once; any
other op reads its inputs and writes its output once; feature maps at the path's dtype size.
Achieved TFLOP/s and GB/s are those over the group's time. Ceilings are measured here on CUDA (a
large FP16 matrix product; a large device-to-device copy counting bytes read and written) and the
datasheet figures of the device are given beside them. A group is memory-bound when its FLOP per
byte is below the ridge point (measured peak FLOP/s over measured bandwidth).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

GROUPS = ("encoder", "shallow", "high-res", "fusion")
# Vendor datasheets, dense FP16/BF16 tensor-core TFLOP/s and HBM TB/s (leads, not readings).
DATASHEET = (("H200", 989.0, 4.8), ("H100 NVL", 835.0, 3.9), ("H100 PCIe", 756.0, 2.0),
             ("H100", 989.0, 3.35))


def datasheet(device_name: str) -> dict | None:
    for key, tflops, tbs in DATASHEET:
        if all(k in device_name for k in key.split()):
            return {"match": key, "fp16_dense_tflops": tflops, "hbm_tb_s": tbs}
    return None


def group_modules(model) -> dict[str, list[str]]:
    """group -> module paths (or encoder method names) of export.networks.StyleGANEX."""
    dec = model.decoder
    first_up2 = next(i for i, c in enumerate(dec.convs) if c.conv.kind == "up2")
    shallow = ["decoder.conv1", "decoder.to_rgb1"]
    high = []
    for i in range(len(dec.convs)):
        (shallow if i < first_up2 else high).append(f"decoder.convs.{i}")
    for k, t in enumerate(dec.to_rgbs):
        (shallow if 2 * k + 1 < first_up2 else high).append(f"decoder.to_rgbs.{k}")
    fusion = [f"encoder.fusion.{k}" for k in range(len(model.encoder.fusion or []))]
    return {"encoder": ["encoder.taps", "encoder.first_feature"], "shallow": shallow,
            "high-res": high, "fusion": fusion}


def _wrap(model, groups: dict[str, list[str]], enter):
    """Replace each group member's forward (or encoder method) by one that runs inside
    enter(group) (a context manager). Returns an undo function."""
    mods = dict(model.named_modules())
    undo = []
    for g, paths in groups.items():
        for p in paths:
            owner_path, _, attr = p.rpartition(".")
            if p in mods:
                owner, attr = mods[p], "forward"
            else:
                owner = mods[owner_path]
            orig = getattr(owner, attr)

            def wrapped(*a, _orig=orig, _g=g, **kw):
                with enter(_g):
                    return _orig(*a, **kw)

            setattr(owner, attr, wrapped)
            undo.append((owner, attr))
    return lambda: [owner.__dict__.pop(attr, None) for owner, attr in undo]


def count_work(config, x1_side: int, batch: int, elem_bytes: int, noise: bool, editing: bool) -> dict:
    """group -> {"flop", "bytes"} of one synth call, counted on the meta device."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    import export.networks as nets
    from runtime.tasks import N_LATENT, noise_shapes

    with torch.device("meta"):
        model = nets.StyleGANEX(config).eval()
    groups = group_modules(model)
    stack: list[str] = []
    fused: list[bool] = []
    work = {g: {"flop": 0, "bytes": 0} for g in (*GROUPS, "other")}

    def nbytes(t) -> int:
        return t.numel() * (elem_bytes if t.dim() == 4 else 4)

    def add(flop: int, nb: int):
        w = work[stack[-1] if stack else "other"]
        w["flop"] += int(flop)
        w["bytes"] += int(nb)

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if fused:
                return out
            flop = 0
            fn = flop_registry.get(func.overloadpacket)
            if fn is not None:
                flop = fn(*args, **kwargs, out_val=out)
            ins = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            if func.overloadpacket not in (torch.ops.aten.view, torch.ops.aten.expand, torch.ops.aten.t,
                                           torch.ops.aten.transpose, torch.ops.aten.select,
                                           torch.ops.aten.slice, torch.ops.aten.unsqueeze,
                                           torch.ops.aten.flip, torch.ops.aten.detach):
                add(flop, sum(nbytes(t) for t in ins + outs))
            return out

    real = nets.modulated_conv2d

    def spy(x, weight, style, **kw):
        k = weight.shape[-1]
        ho, wo = x.shape[2:] if kw.get("padding") is None else (
            x.shape[2] + 2 * kw["padding"] - kw.get("dilation", 1) * (k - 1),
            x.shape[3] + 2 * kw["padding"] - kw.get("dilation", 1) * (k - 1))
        b, cin = x.shape[:2]
        cout = weight.shape[0]
        nb = (b * cin * x.shape[2] * x.shape[3] + b * cout * ho * wo) * elem_bytes \
            + weight.numel() * elem_bytes + (b * ho * wo * elem_bytes if kw.get("noise") is not None else 0)
        add(2 * b * cout * ho * wo * cin * k * k, nb)
        fused.append(True)
        try:
            return real(x, weight, style, **kw)
        finally:
            fused.pop()

    @contextlib.contextmanager
    def enter(g):
        stack.append(g)
        try:
            yield
        finally:
            stack.pop()

    undo = _wrap(model, groups, enter)
    nets.modulated_conv2d = spy
    try:
        with torch.device("meta"), torch.inference_mode(), Counter():
            x1 = torch.zeros(batch, 3, x1_side, x1_side)
            wplus = torch.zeros(batch, N_LATENT, config.style_dim)
            ew = torch.zeros(batch, N_LATENT, config.style_dim) if editing else None
            noises = [torch.zeros(batch, 1, h, w) for h, w in noise_shapes(x1_side, x1_side)] if noise else None
            model.synth(x1, wplus, editing_w=ew, noises=noises)
    finally:
        nets.modulated_conv2d = real
        undo()
    return work


def measure_ceilings() -> dict:
    """Measured on this CUDA device: FP16 matrix product TFLOP/s (8192^3, random data, median of
    10 after 3 warm-ups) and device-to-device copy GB/s (2 GiB, bytes read + written)."""
    import torch

    def median_ms(fn, n=10):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(n):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e))
        return sorted(ts)[n // 2]

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    mm = median_ms(lambda: a @ b)
    del a, b
    src = torch.randn(2**30, device="cuda", dtype=torch.float16)  # 2 GiB
    dst = torch.empty_like(src)
    cp = median_ms(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return {"fp16_matmul_tflops": 2 * n**3 / (mm * 1e-3) / 1e12, "copy_gb_s": nbytes / (cp * 1e-3) / 1e9,
            "method": "8192^3 fp16 matmul, randn; 2 GiB device copy (read + write); median of 10"}


def _annotation_time(avg, cuda: bool) -> tuple[float, str]:
    """us of an annotation's kernels (CUDA) or of its CPU range, and the field used."""
    if cuda:
        for f in ("device_time_total", "cuda_time_total"):
            v = getattr(avg, f, None)
            if v is not None:
                return float(v), f
    return float(avg.cpu_time_total), "cpu_time_total"


def profile(task: str, output: int, batch: int, device: str, iters: int = 5, warmup: int = 2,
            width_div: int = 1, seed: int = 0, ceilings: bool = True) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, record_function

    from bench.cli import make_inputs
    from export.checkpoint import build_model, load_or_random
    from runtime.backends.torch_gpu import TorchPath
    from runtime.tasks import OUTPUT_SCALE, get_task

    spec = get_task(task)
    if "synth" not in spec.graphs:
        raise SystemExit(f"bench.gpu.profile: task {task} has no synth graph")
    x1_side = output // OUTPUT_SCALE
    ck = load_or_random(task, None, True, seed=seed, width_div=width_div)
    model = build_model(ck, task).eval()
    cuda = device == "cuda"
    path = TorchPath(model, device, precision="fp16" if cuda else "fp32", modconv_impl="auto" if cuda else None)
    noise = spec.noise == "random"
    ew = None if ck.editing_w is None else ck.editing_w.float().cpu().numpy()
    inp = make_inputs(task, x1_side, batch, 1, seed, ck.config.style_dim, ew, noise)

    def t(a, key):
        return None if a is None else torch.from_numpy(a).to(device, path.input_dtype(key))

    x1, x2, editing_w = t(inp.frames[0], "x1"), t(inp.x2, "x2"), t(inp.editing_w, "editing_w")
    noises = None if inp.noises is None else [t(n, "noise") for n in inp.noises]
    groups = group_modules(path.model)
    undo = _wrap(path.model, groups, lambda g: record_function(f"sgex::{g}"))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode():
        wplus = path.run("style", x2=x2)

        def call():
            return path.run("synth", x1=x1, wplus=wplus, editing_w=editing_w, noises=noises)

        for _ in range(warmup):
            call()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(iters):
                call()
            if cuda:
                torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / iters
    undo()
    avgs = prof.key_averages()
    if cuda:  # the device-side (kernel) events, as torch.profiler's own table totals them
        total_us = sum(float(getattr(a, "self_device_time_total", 0.0) or 0.0) for a in avgs
                       if "CPU" not in str(getattr(a, "device_type", "CPU")))
    else:  # CPU: the calls' wall time (annotations nest, so summing CPU times would double count)
        total_us = wall_ms * 1e3 * iters
    elem = 2 if cuda else 4
    work = count_work(ck.config, x1_side, batch, elem, noise, ew is not None)
    ceil = measure_ceilings() if cuda and ceilings else None
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    ds = datasheet(name) if cuda else None
    ridge = None if not ceil else ceil["fp16_matmul_tflops"] * 1e12 / (ceil["copy_gb_s"] * 1e9)
    rows, field = {}, None
    for g in GROUPS:
        us = 0.0
        for a in avgs:
            if a.key == f"sgex::{g}":
                us, field = _annotation_time(a, cuda)
        rows[g] = {"time_ms": us / 1e3 / iters}
    rows["other"] = {"time_ms": max(0.0, total_us / 1e3 / iters - sum(r["time_ms"] for r in rows.values()))}
    for g, r in rows.items():
        w = work[g]
        s = r["time_ms"] * 1e-3
        r.update(share=r["time_ms"] / (total_us / 1e3 / iters) if total_us else None,
                 gflop=w["flop"] / 1e9, mbytes=w["bytes"] / 1e6,
                 flop_per_byte=w["flop"] / w["bytes"] if w["bytes"] else None,
                 tflops=w["flop"] / s / 1e12 if s > 0 else None,
                 gb_s=w["bytes"] / s / 1e9 if s > 0 else None)
        if ceil and r["tflops"] is not None:
            r["of_measured_peak"] = r["tflops"] / ceil["fp16_matmul_tflops"]
            r["of_measured_bandwidth"] = r["gb_s"] / ceil["copy_gb_s"]
        if ds and r["tflops"] is not None:
            r["of_datasheet_peak"] = r["tflops"] / ds["fp16_dense_tflops"]
        if ridge is not None and r["flop_per_byte"] is not None:
            r["memory_bound"] = r["flop_per_byte"] < ridge
    return {"format": "sgex-gpu-profile", "version": 1, "task": task, "output": output, "x1": x1_side,
            "batch": batch, "device": device, "device_name": name, "path": path.describe(),
            "iters": iters, "warmup": warmup, "width_div": width_div, "random_weights": True,
            "time_field": field, "kernel_time_ms_per_call": total_us / 1e3 / iters,
            "wall_ms_per_call_profiled": wall_ms, "ceilings_measured": ceil, "datasheet": ds,
            "ridge_flop_per_byte": ridge, "groups": rows,
            "torch": torch.__version__}


def format_table(res: dict) -> str:
    lines = [f"profile {res['task']} output {res['output']} batch {res['batch']} on {res['device_name']} "
             f"({res['path']}): {res['kernel_time_ms_per_call']:.3f} ms of kernels per synth call",
             "| group | ms | share | GFLOP | MB moved | FLOP/B | TFLOP/s | of peak | GB/s | memory-bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for g, r in res["groups"].items():
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)
        mb = r.get("memory_bound")
        lines.append(f"| {g} | {r['time_ms']:.3f} | {f(r['share'], '.1%')} | {r['gflop']:.1f} | "
                     f"{r['mbytes']:.1f} | {f(r['flop_per_byte'], '.0f')} | {f(r['tflops'], '.2f')} | "
                     f"{f(r.get('of_measured_peak'), '.1%')} | {f(r['gb_s'], '.0f')} | "
                     f"{'-' if mb is None else ('yes' if mb else 'no')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu.profile", description=__doc__.split("\n\n")[0],
                                 epilog="example: python3 -m bench.gpu.profile --task superres --output 1024 "
                                        "--json profile.json")
    ap.add_argument("--task", default="superres")
    ap.add_argument("--output", type=int, default=1024, help="output side, a multiple of 32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--width-div", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--json", required=True, help="write the result here")
    args = ap.parse_args(argv)
    if args.output <= 0 or args.output % 32:
        print(f"bench.gpu.profile: --output {args.output}: must be a positive multiple of 32", file=sys.stderr)
        return 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu.profile: --device cuda: no CUDA device", file=sys.stderr)
        return 2
    res = profile(args.task, args.output, args.batch, args.device, args.iters, args.warmup, args.width_div)
    from runtime.manifest import atomic_write_text

    atomic_write_text(args.json, json.dumps(res, indent=1) + "\n")
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU path on CUDA (marked gpu): the Triton kernel against the reference at every stride-1
modulated conv the generator runs at outputs 1024 and 2048 (read off the model, FP16 and FP32), and
sgex's torch path in FP16 (FP32 islands, fused op) against FP32: finite, PSNR, CUDA graphs equal to
eager. bench/gpu/run.sh runs these first (step a).

SGEX_GPU_SMOKE=1 (bench/gpu/run.sh --cpu-smoke) runs the same tests on CPU at tiny sizes with the
kernel under TRITON_INTERPRET=1 (the conftest then does not skip them): output 32 at width_div 4,
the cheapest calls only; what needs a real GPU (CUDA graphs) skips.

SGEX_GPU_REPORT=DIR writes the measured errors and PSNRs to DIR/gpu_tests.json for the report.

Tolerances: the kernel's (tests/kernels/modconv_cases.py), FP16 relative to the output scale as in
test_modconv_triton.test_gpu_generator_shapes (more K terms than the CPU cases). FP16 path vs FP32:
at least FP16_PSNR_DB over the FP32 output's range; FP16 keeps 11 significant bits (about 66 dB per
rounding), random full-width weights amplify error through ~100 layers: 30 dB is a floor that an
overflow or a wrongly cast island (errors of the output's own size, < 10 dB) cannot pass.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
from modconv_cases import FP16_ABS_TOL, FP32_REL_TOL  # noqa: E402

pytestmark = pytest.mark.gpu

SMOKE = os.environ.get("SGEX_GPU_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
OUTPUTS = (32,) if SMOKE else (1024, 2048)
WIDTH_DIV = 4 if SMOKE else 1
SMOKE_MAX_CIN = 16  # interpreter cost grows with Cin * k * k: the smoke keeps the cheap calls
FP16_PSNR_DB = 30.0
_REPORT: dict = {}


def _record(section: str, key: str, value) -> None:
    d = os.environ.get("SGEX_GPU_REPORT")
    if not d:
        return
    _REPORT.setdefault(section, {})[key] = value
    Path(d).mkdir(parents=True, exist_ok=True)
    (Path(d) / "gpu_tests.json").write_text(json.dumps(_REPORT, indent=1) + "\n")


def _calls():
    from bench.gpu.shapes import distinct, modconv_calls
    from export.networks import ModelConfig

    out = []
    for o in OUTPUTS:
        for c in distinct(modconv_calls(ModelConfig(width_div=WIDTH_DIV), o // 4, batch=2)):
            if SMOKE and c.x_shape[1] > SMOKE_MAX_CIN:
                continue
            out.append(pytest.param(c, id=f"out{o}-{c.layer}-c{c.x_shape[1]}x{c.weight_shape[0]}-"
                                          f"{c.x_shape[2]}-d{c.dilation}-p{c.padding}"))
    return out


@pytest.fixture(autouse=True)
def _mode():
    if not SMOKE and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: the GPU run needs the compiled kernel")
    if SMOKE and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("SGEX_GPU_SMOKE=1 needs TRITON_INTERPRET=1")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("call", _calls())
def test_kernel_at_every_generator_call(call, dtype):
    from kernels.modconv import modulated_conv2d_reference
    from kernels.modconv_triton import modulated_conv2d_triton

    dt = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    g = torch.Generator().manual_seed(hash(call.key()) % 2**31)
    b, cin, h, w = call.x_shape
    cout, _, k, _ = call.weight_shape
    x = torch.randn(b, cin, h, w, generator=g).to(DEVICE, dt)
    weight = (torch.randn(cout, cin, k, k, generator=g) / math.sqrt(cin * k * k)).to(DEVICE, dt)
    style = (torch.randn(b, cin, generator=g) + 1).to(DEVICE)
    ho, wo = call.out_side
    noise = torch.randn(b, 1, ho, wo, generator=g).to(DEVICE, dt) if call.noise else None
    ns = torch.tensor([0.3], device=DEVICE) if call.noise else None
    bias = torch.randn(cout, generator=g).to(DEVICE, dt) if call.bias else None
    kw = dict(demodulate=call.demodulate, dilation=call.dilation, padding=call.padding,
              noise_strength=ns, activate=call.activate)
    y = modulated_conv2d_triton(x, weight, style, noise=noise, bias=bias, **kw)
    f = (lambda t: None if t is None else t.float())
    ref = modulated_conv2d_reference(x.float(), weight.float(), style, noise=f(noise), bias=f(bias), **kw)
    assert y.shape == ref.shape and y.dtype == dt
    assert torch.isfinite(y).all()
    err = (y.float() - ref).abs().max().item()
    ref_max = ref.abs().max().item()
    _record("kernel", f"{call.layer}/{call.x_shape}/{dtype}", {"max_abs_err": err, "ref_max": ref_max})
    if dtype == "fp32":
        assert err / ref_max <= FP32_REL_TOL, (err, ref_max)
    else:
        assert err <= FP16_ABS_TOL * max(1.0, ref_max / 4), (err, ref_max)


@pytest.fixture(scope="module")
def models():
    import copy

    from export.checkpoint import build_model, load_or_random

    ck = load_or_random("superres", None, True, seed=0, width_div=WIDTH_DIV)
    base = build_model(ck, "superres").eval()
    return lambda: copy.deepcopy(base)


def _inputs(side, batch=1, seed=0):
    from runtime.tasks import noise_shapes

    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand(batch, 3, side, side, generator=g) * 2 - 1
    x2 = torch.rand(batch, 3, 256, 256, generator=g) * 2 - 1
    noises = [torch.randn(batch, 1, h, w, generator=g) for h, w in noise_shapes(side, side)]
    return x1, x2, noises


def _run(path, x1, x2, noises):
    def t(a, key):
        return a.to(DEVICE, path.input_dtype(key))

    with torch.inference_mode():
        w = path.run("style", x2=t(x2, "x2"))
        return path.run("synth", x1.shape[-1], x1=t(x1, "x1"), wplus=w, editing_w=None,
                        noises=[t(n, "noise") for n in noises]).float().cpu()


def test_torch_fp16_path_vs_fp32(models):
    from runtime.backends.torch_gpu import TorchPath

    side = OUTPUTS[0] // 4
    x1, x2, noises = _inputs(side)
    ref = _run(TorchPath(models(), DEVICE, precision="fp32", modconv_impl="reference"), x1, x2, noises)
    # The smoke checks the islands' wiring with the reference op (the interpreted kernel over every
    # layer would take minutes; the kernel itself is test_kernel_at_every_generator_call).
    fp16 = TorchPath(models(), DEVICE, precision="fp16", modconv_impl="reference" if SMOKE else "triton")
    y = _run(fp16, x1, x2, noises)
    assert torch.isfinite(y).all(), "FP16 path produced NaN/Inf"
    mse = float(((y.double() - ref.double()) ** 2).mean())
    rng = float(ref.max() - ref.min())
    psnr = 10 * math.log10(rng**2 / mse) if mse > 0 else float("inf")
    psnr2 = 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")
    _record("fp16_vs_fp32", f"superres-out{side * 4}-b1", {
        "psnr_ref_range_db": psnr, "psnr_peak2_db": psnr2, "ref_range": rng,
        "max_abs_diff": float((y - ref).abs().max()), "islands": len(fp16.islands)})
    assert psnr >= FP16_PSNR_DB, f"FP16 vs FP32 PSNR {psnr:.1f} dB < {FP16_PSNR_DB}"


def test_cuda_graphs_equal_eager(models):
    if SMOKE:
        pytest.skip("CUDA graphs need a real GPU (the CPU smoke tests the cache with a fake: "
                    "tests/runtime/test_torch_fastpath.py)")
    from runtime.backends.torch_gpu import TorchPath

    side = OUTPUTS[0] // 4
    eager = TorchPath(models(), DEVICE, precision="fp16", modconv_impl="triton")
    graphed = TorchPath(models(), DEVICE, precision="fp16", modconv_impl="triton", cuda_graphs=True)
    for seed in (1, 2):  # the second call replays the captured graphs with new inputs
        x1, x2, noises = _inputs(side, seed=seed)
        ye, yg = _run(eager, x1, x2, noises), _run(graphed, x1, x2, noises)
        assert torch.equal(ye, yg) or float((ye - yg).abs().max()) <= 1e-3 * float(ye.abs().max())
    assert graphed.graphs.captures == 2

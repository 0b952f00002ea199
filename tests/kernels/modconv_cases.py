"""Kernel-vs-reference cases shared by test_modconv_triton.py (CPU, Triton interpreter, run in a
subprocess) and its GPU twin. Run as a script it evaluates every case on CPU and prints one JSON
object {case id: {"err": float, "ref_max": float, "dtype": str, "shape_ok": bool} or
{"error": str}}; the caller must start it with TRITON_INTERPRET=1 in its environment, because
triton fixes the interpreter mode when it is first imported.

Shapes: Cin / Cout straddle the interpreter's 16-wide N and K tiles (two K steps, two N tiles),
Ho*Wo straddles its BLOCK_M = 64, H != W, B = 1 and 3, every dilation of the generator with
"same" padding, kernels 3 and 1.
"""

from __future__ import annotations

import json
import sys

# The kernel's tolerances, defined once (justified in test_modconv_triton.py's docstring).
FP32_REL_TOL = 1e-4
FP16_ABS_TOL = 2e-2

ALL_ON = dict(demodulate=True, noise=True, bias=True, activate=True)
ALL_OFF = dict(demodulate=False, noise=False, bias=False, activate=False)


def _cases():
    cases = {}
    dilated = [(1, (3, 20, 19, 9, 12)), (2, (1, 17, 5, 12, 7)), (4, (3, 6, 18, 10, 11)),
               (8, (1, 19, 17, 11, 9))]
    for dtype in ("fp32", "fp16"):
        for d, shape in dilated:
            for fname, flags in (("all_on", ALL_ON), ("all_off", ALL_OFF)):
                cases[f"3x3-d{d}-{fname}-{dtype}"] = dict(shape=shape, k=3, dilation=d, dtype=dtype,
                                                          seed=d, **flags)
        cases[f"3x3-d2-demod_bias-{dtype}"] = dict(
            shape=(3, 7, 9, 6, 8), k=3, dilation=2, dtype=dtype, seed=11,
            demodulate=True, noise=False, bias=True, activate=False)
        cases[f"3x3-d2-noise_act-{dtype}"] = dict(
            shape=(3, 7, 9, 6, 8), k=3, dilation=2, dtype=dtype, seed=12,
            demodulate=False, noise=True, bias=False, activate=True)
        for b in (1, 3):  # ToRGB: 1x1, Cout = 3, bias, no demod, no activation
            cases[f"1x1-torgb-b{b}-{dtype}"] = dict(
                shape=(b, 18, 3, 7, 12), k=1, dilation=1, dtype=dtype, seed=b,
                demodulate=False, noise=False, bias=True, activate=False)
        cases[f"1x1-all_on-{dtype}"] = dict(shape=(3, 5, 20, 5, 9), k=1, dilation=1, dtype=dtype,
                                             seed=5, **ALL_ON)
    # "valid" padding at dilation 2 (output shrinks by 4), fp16 style with fp32 features, the gain
    # as a 1-element tensor, noise with batch 1 broadcast over B = 3.
    cases["3x3-d2-valid-mixed"] = dict(shape=(3, 9, 10, 12, 10), k=3, dilation=2, padding=0,
                                       dtype="fp32", style_dtype="fp16", gain_tensor=True,
                                       noise_batch=1, seed=7, **ALL_ON)
    # Through the public function: modulated_conv2d(impl="triton").
    cases["public-impl-triton"] = dict(shape=(1, 6, 7, 5, 6), k=3, dilation=1, dtype="fp32",
                                       seed=2, public=True, **ALL_ON)
    return cases


CASES = _cases()


def run_case(case: dict, device: str = "cpu") -> dict:
    """Kernel and reference on the same (dtype-rounded) inputs; returns the max abs error."""
    import torch

    from kernels.modconv import modulated_conv2d, modulated_conv2d_reference
    from kernels.modconv_triton import modulated_conv2d_triton

    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    dtype = dtypes[case["dtype"]]
    b, cin, cout, h, w = case["shape"]
    k, d = case["k"], case["dilation"]
    padding = case.get("padding")
    pad = d * (k - 1) // 2 if padding is None else padding
    ho, wo = h + 2 * pad - d * (k - 1), w + 2 * pad - d * (k - 1)
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(b, cin, h, w, generator=g).to(dtype)
    wt = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(dtype)
    st = (torch.randn(b, cin, generator=g) + 1.0).to(dtypes[case.get("style_dtype", "fp32")])
    noise = torch.randn(case.get("noise_batch", b), 1, ho, wo, generator=g).to(dtype)
    bias = torch.randn(cout, generator=g).to(dtype)
    gain = torch.tensor([0.4]) if case.get("gain_tensor") else 0.7
    kw = dict(demodulate=case["demodulate"], dilation=d, padding=padding, activate=case["activate"],
              noise_strength=gain)
    nz = noise if case["noise"] else None
    bs = bias if case["bias"] else None
    ref = modulated_conv2d_reference(x.float(), wt.float(), st.float(),
                                     noise=None if nz is None else nz.float(),
                                     bias=None if bs is None else bs.float(), **kw)
    dev = torch.device(device)
    move = (lambda t: None if t is None else t.to(dev))
    if isinstance(gain, torch.Tensor):
        kw["noise_strength"] = gain.to(dev)
    if case.get("public"):
        y = modulated_conv2d(move(x), move(wt), move(st), noise=move(nz), bias=move(bs),
                             impl="triton", **kw)
    else:
        y = modulated_conv2d_triton(move(x), move(wt), move(st), noise=move(nz), bias=move(bs), **kw)
    y = y.cpu()
    return {"err": (y.float() - ref).abs().max().item(), "ref_max": ref.abs().max().item(),
            "dtype": str(y.dtype).replace("torch.", ""), "shape_ok": tuple(y.shape) == tuple(ref.shape)}


def main() -> int:
    from kernels import modconv_triton

    out = {"_interpreter_configs": len(modconv_triton.autotuned_kernel().configs)}
    for name, case in CASES.items():
        try:
            out[name] = run_case(case, "cpu")
        except Exception as e:  # reported per case by the parent test
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fused modulated (dilated) convolution as one implicit-GEMM Triton kernel.

The maths (kernels/modconv.py defines the op; this file computes exactly that):

    y[b, o, p] = act(demod[b, o] * sum_{c, t} x[b, c, p + off_t] * style[b, c] * weight[o, c, t]
                     + noise_strength * noise[b, 0, p] + bias[o])
    demod[b, o] = rsqrt(sum_{c, t} (weight[o, c, t] * style[b, c])^2 + 1e-8)

with t running over the k*k taps, off_t = (kh*dilation - padding, kw*dilation - padding) and
p over the Ho*Wo output pixels. Per sample b this is a GEMM

    Y_b [Ho*Wo, Cout] = A_b [Ho*Wo, Cin*k*k] @ Wmod_b [Cin*k*k, Cout]

where A_b is the im2col matrix of x_b (never materialised: each tile is gathered from NCHW x with
the tap offsets and zero padding as load masks) and Wmod_b = weight * style_b is the StyleGAN2
per-sample weight, formed tile by tile in registers (FP32) instead of in memory. The grid is
(Ho*Wo / BLOCK_M, Cout / BLOCK_N, B): one sample per program, so the style is a vector along K
and the demodulation a vector along N.

Demodulation is computed inside the same kernel. Every program already walks all of K for its N
columns, so it accumulates sum(Wmod^2) over the very tiles it feeds to the dot product, in FP32,
before they are rounded to the input dtype. This costs BLOCK_K*BLOCK_N multiply-adds per K step
(vs BLOCK_M*BLOCK_N*BLOCK_K for the GEMM), needs no second kernel, no [B, Cout] scratch tensor,
and keeps the op a single launch -- which is what the TensorRT ahead-of-time plugin ABI
(trt_plugin.py) can express: one PTX kernel per node.

Work and bytes per call (dtype size s): 2*B*Cout*Ho*Wo*Cin*k*k FLOPs. Each program reads its x
rows once per tap (k*k overlapping windows, served by L1/L2), so DRAM sees x about once per N
tile, B*Cin*H*W*s*ceil(Cout/BLOCK_N); the weight (Cout*Cin*k*k*s) is re-read per (M tile, sample)
from L2; noise B*Ho*Wo*s once per N tile; y B*Cout*Ho*Wo*s written once. The un-fused PyTorch
formulation also writes and re-reads x*style and the conv output (two extra full-size round trips)
and runs the epilogue as 3-4 elementwise kernels; the official grouped formulation materialises
B per-sample weights.

Precision: FP16 or FP32 feature maps and weights (same dtype), style and noise_strength FP16 or
FP32; accumulation, modulation, demodulation and the epilogue in FP32; output in x's dtype. FP32
dot products use tf32x3 (each operand split into two TF32 halves, three tensor-core products): the
dropped lo*lo term is ~2^-22 relative, so FP32 matches the reference to ~1e-6 without plain TF32's
~1e-3 error and on tensor cores (IEEE dot products would run on FMA units).

Argument order is inputs -> int scalars -> outputs -> compile-time constants, the order the
TensorRT AOT plugin passes them (inputs, SymIntExprs extra args, outputs).

Interpreter: with TRITON_INTERPRET=1 in the environment before triton is first imported (triton
decorates its own tl.* helpers at import, so the mode is fixed then), the launcher runs on CPU
tensors with one small config. The kernel body below is a plain function that `jit_kernel()` /
`autotuned_kernel()` decorate on first use, once per mode, so importing this module never decides
the mode by itself; the launcher refuses, with one line, a mode that changed after triton's import.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.modconv import DEMOD_EPS, LRELU_GAIN, LRELU_SLOPE

__all__ = ["modulated_conv2d_triton", "jit_kernel", "autotuned_kernel", "interpreting",
           "KERNEL_ARG_NAMES", "INT_SCALAR_NAMES", "CONSTEXPR_NAMES", "GPU_CONFIGS"]

# Float constants are compile-time: the plugin ABI has int scalars only, and they never change.
_SLOPE = tl.constexpr(LRELU_SLOPE)
_GAIN = tl.constexpr(LRELU_GAIN)
_EPS = tl.constexpr(DEMOD_EPS)


def modconv_kernel(
    # ---- inputs (pointers) ----
    x_ptr,          # [B, Cin, H, W]     T, contiguous NCHW
    w_ptr,          # [Cout, Cin, K, K]  T, contiguous, already scaled (conv layout)
    style_ptr,      # [B, Cin]           S (fp16/fp32), read as fp32
    noise_ptr,      # [B, 1, Ho, Wo]     T; not read unless HAS_NOISE
    ns_ptr,         # [1]                S noise_strength; not read unless HAS_NOISE
    bias_ptr,       # [Cout]             T; not read unless HAS_BIAS
    # ---- int scalars (int32; shapes that vary at run time) ----
    C_in, C_out, H, W, H_out, W_out,
    # ---- outputs ----
    y_ptr,          # [B, Cout, Ho, Wo]  T
    # ---- compile-time constants ----
    KSIZE: tl.constexpr,        # k (1 or 3)
    DILATION: tl.constexpr,     # 1, 2, 4, 8
    PADDING: tl.constexpr,      # symmetric zero padding
    DEMODULATE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATE: tl.constexpr,
    TF32X3: tl.constexpr,       # fp32 inputs: 3-pass TF32 products (fp32-level error, tensor cores)
    BLOCK_M: tl.constexpr,      # output pixels per program
    BLOCK_N: tl.constexpr,      # output channels per program
    BLOCK_K: tl.constexpr,      # input channels per K step (each step covers all k*k taps)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # sample offsets can pass 2^31 elements; tiles cannot

    hw_in = H * W
    hw_out = H_out * W_out
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # flat output pixel
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel
    mask_m = offs_m < hw_out
    mask_n = offs_n < C_out
    oh = offs_m // W_out
    ow = offs_m % W_out

    x_b = x_ptr + b * C_in * hw_in
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    wsq = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum over K of Wmod^2 for these columns

    # K loop: the k*k taps outside (unrolled), channels inside. Each inner iteration loads one A
    # tile and one weight tile, so the software pipeliner buffers num_stages tiles, not k*k times as
    # many (with the channel loop outside, fp32's cp.async pipelining needed > 200 KiB of SMEM).
    for kh in tl.static_range(KSIZE):
        ih = oh + (kh * DILATION - PADDING)
        row_ok = mask_m & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KSIZE):
            iw = ow + (kw * DILATION - PADDING)
            pix_ok = row_ok & (iw >= 0) & (iw < W)
            x_tap = x_b + (ih * W + iw)[:, None]                                     # [BLOCK_M, 1]
            w_tap = w_ptr + offs_n[None, :] * (C_in * KSIZE * KSIZE) + (kh * KSIZE + kw)  # [1, BLOCK_N]
            for c0 in range(0, C_in, BLOCK_K):
                offs_c = c0 + tl.arange(0, BLOCK_K)
                mask_c = offs_c < C_in
                s = tl.load(style_ptr + b * C_in + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                # A tile [BLOCK_M, BLOCK_K]: zero padding and ragged edges are masked loads.
                a = tl.load(x_tap + offs_c[None, :] * hw_in,
                            mask=pix_ok[:, None] & mask_c[None, :], other=0.0)
                # Wmod tile [BLOCK_K, BLOCK_N] = weight[n, c, kh, kw] * style[b, c], fp32.
                wt = tl.load(w_tap + offs_c[:, None] * (KSIZE * KSIZE),
                             mask=mask_c[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
                wmod = wt * s[:, None]
                if DEMODULATE:
                    wsq += tl.sum(wmod * wmod, axis=0)
                if TF32X3:
                    acc = tl.dot(a, wmod.to(a.dtype), acc, input_precision="tf32x3")
                else:
                    acc = tl.dot(a, wmod.to(a.dtype), acc)

    # ---- epilogue, all fp32: demod, noise, bias, leaky ReLU * sqrt(2) ----
    if DEMODULATE:
        acc = acc * tl.rsqrt(wsq + _EPS)[None, :]
    if HAS_NOISE:
        nz = tl.load(noise_ptr + b * hw_out + offs_m, mask=mask_m, other=0.0).to(tl.float32)
        ns = tl.load(ns_ptr).to(tl.float32)
        acc = acc + ns * nz[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACTIVATE:
        acc = tl.where(acc >= 0, acc, acc * _SLOPE) * _GAIN
    y_b = y_ptr + b * C_out * hw_out
    tl.store(y_b + offs_n[None, :] * hw_out + offs_m[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


KERNEL_ARG_NAMES = ("x_ptr", "w_ptr", "style_ptr", "noise_ptr", "ns_ptr", "bias_ptr",
                    "C_in", "C_out", "H", "W", "H_out", "W_out", "y_ptr")
INT_SCALAR_NAMES = KERNEL_ARG_NAMES[6:12]
CONSTEXPR_NAMES = ("KSIZE", "DILATION", "PADDING", "DEMODULATE", "HAS_NOISE", "HAS_BIAS",
                   "ACTIVATE", "TF32X3", "BLOCK_M", "BLOCK_N", "BLOCK_K")

# Autotune space for GPUs: wide M tiles (output pixels are the long GEMM dimension at every
# generator layer), N up to 128 (Cout is 3..512), K steps of 32/64 channels x k*k taps.
GPU_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=3),  # ToRGB: Cout = 3
]
# The interpreter runs every program in numpy: one config, the smallest tl.dot accepts.
INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set: kernels run on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _jit(interpret: bool):
    # `interpret` only keys the cache: triton.jit itself reads TRITON_INTERPRET right now.
    if interpret:
        _fix_interpreter_scalar_index()
    return triton.jit(modconv_kernel)


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter holds int scalars as 1-element 1-d numpy arrays and converts them
    with int(array), which numpy >= 2.4 rejects ("only 0-dimensional arrays can be converted"), so
    `range(0, C_in, BLOCK_K)` fails under TRITON_INTERPRET=1. Re-define that one conversion on
    the interpreter's tensor patch, only when this numpy needs it. Compiled kernels are untouched."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    original = interpreter._patch_lang_tensor
    if getattr(original, "sgex_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.sgex_index_fix = True
    interpreter._patch_lang_tensor = patched


def jit_kernel():
    """The plain (not autotuned) kernel for the current mode; trt_plugin compiles it ahead of time."""
    return _jit(interpreting())


@functools.cache
def _autotuned(interpret: bool):
    if interpret:
        configs = [_config(INTERPRETER_CONFIG)]
    else:
        configs = [_config(c) for c in GPU_CONFIGS]
    # Tiles depend on the GEMM sizes and the tap pattern; the epilogue flags do not move the optimum.
    return triton.autotune(configs=configs, key=["C_in", "C_out", "H_out", "W_out", "KSIZE", "DILATION"])(
        _jit(interpret))


def autotuned_kernel():
    """The autotuned kernel for the current mode (one config under the interpreter)."""
    return _autotuned(interpreting())


def _check_device(x: torch.Tensor) -> None:
    from triton.runtime.interpreter import InterpretedFunction

    interpret = interpreting()
    # triton decorates its own tl.* helpers when it is imported, so the mode is fixed then.
    imported_interpreting = isinstance(tl.zeros, InterpretedFunction)
    if interpret != imported_interpreting:
        raise RuntimeError(
            f"modulated_conv2d_triton: TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} now, but "
            f"triton was imported with the interpreter {'on' if imported_interpreting else 'off'}; set "
            "TRITON_INTERPRET before the first `import triton` in the process")
    if x.is_cuda and interpret:
        raise RuntimeError("modulated_conv2d_triton: TRITON_INTERPRET=1 is set but x is a CUDA "
                           "tensor; unset it to run the compiled kernel")
    if not x.is_cuda and not interpret:
        raise RuntimeError(f"modulated_conv2d_triton: needs CUDA tensors (got {x.device}); CPU "
                           "tensors run only under TRITON_INTERPRET=1 (set before importing triton)")


def _config(c: dict) -> triton.Config:
    c = dict(c)
    return triton.Config({k: c.pop(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}, **c)


def modulated_conv2d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    style: torch.Tensor,
    *,
    demodulate: bool = True,
    dilation: int = 1,
    padding: int | None = None,
    noise: torch.Tensor | None = None,
    noise_strength: torch.Tensor | float | None = None,
    bias: torch.Tensor | None = None,
    activate: bool = True,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Forward-only fused modulated conv. Shapes and semantics as kernels.modconv.modulated_conv2d.

    x [B, Cin, H, W] fp16/fp32 (CUDA; CPU under TRITON_INTERPRET=1), weight [Cout, Cin, k, k] in
    x's dtype, style [B, Cin] fp16/fp32, noise [B or 1, 1, Ho, Wo], noise_strength scalar or
    1-element tensor, bias [Cout]. Returns [B, Cout, Ho, Wo] in x's dtype.

    out: a contiguous [B, Cout, Ho, Wo] tensor of x's dtype to write into (the TensorRT JIT plugin
    passes its output buffer). config: one entry of GPU_CONFIGS to launch with instead of the
    autotuner (the plugin's tactics)."""
    # ---- check ----
    if x.dtype not in (torch.float16, torch.float32):
        raise TypeError(f"modulated_conv2d_triton: x must be float16 or float32, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"modulated_conv2d_triton: weight dtype {weight.dtype} != x dtype {x.dtype}")
    if style.dtype not in (torch.float16, torch.float32):
        raise TypeError(f"modulated_conv2d_triton: style must be float16 or float32, got {style.dtype}")
    if x.ndim != 4 or weight.ndim != 4 or style.ndim != 2:
        raise ValueError("modulated_conv2d_triton: expected x [B,Cin,H,W], weight [Cout,Cin,k,k], "
                         f"style [B,Cin]; got {tuple(x.shape)}, {tuple(weight.shape)}, {tuple(style.shape)}")
    B, C_in, H, W = x.shape
    C_out, _, k, k2 = weight.shape
    if k != k2 or weight.shape[1] != C_in or tuple(style.shape) != (B, C_in):
        raise ValueError(f"modulated_conv2d_triton: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"style {tuple(style.shape)} disagree")
    if dilation < 1:
        raise ValueError(f"modulated_conv2d_triton: dilation must be >= 1, got {dilation}")
    if padding is None:
        padding = dilation * (k - 1) // 2
    if padding < 0:
        raise ValueError(f"modulated_conv2d_triton: padding must be >= 0, got {padding}")
    H_out = H + 2 * padding - dilation * (k - 1)
    W_out = W + 2 * padding - dilation * (k - 1)
    if H_out < 1 or W_out < 1:
        raise ValueError(f"modulated_conv2d_triton: empty output {H_out}x{W_out} for input {H}x{W}, "
                         f"k={k}, dilation={dilation}, padding={padding}")
    if max(C_in * H * W, C_out * H_out * W_out) >= 2**31:
        raise ValueError("modulated_conv2d_triton: one sample exceeds 2^31 elements (int32 tile offsets)")
    if bias is not None and tuple(bias.shape) != (C_out,):
        raise ValueError(f"modulated_conv2d_triton: bias must be [{C_out}], got {tuple(bias.shape)}")

    x = x.contiguous()
    weight = weight.contiguous()
    style = style.contiguous()
    dummy = x  # stands in for absent pointers; the constexpr flags keep it from being read
    has_noise, has_bias = noise is not None, bias is not None
    if has_noise:
        if noise.ndim != 4 or noise.shape[1] != 1 or tuple(noise.shape[2:]) != (H_out, W_out) \
                or noise.shape[0] not in (1, B):
            raise ValueError(f"modulated_conv2d_triton: noise must be [{B} or 1, 1, {H_out}, {W_out}], "
                             f"got {tuple(noise.shape)}")
        noise = noise.to(x.dtype).expand(B, 1, H_out, W_out).contiguous()
        if noise_strength is None:
            noise_strength = 1.0
        if isinstance(noise_strength, torch.Tensor):
            if noise_strength.numel() != 1:
                raise ValueError("modulated_conv2d_triton: noise_strength must have one element")
            ns = noise_strength.reshape(1).to(device=x.device, dtype=torch.float32)
        else:
            ns = torch.full((1,), float(noise_strength), dtype=torch.float32, device=x.device)
    else:
        noise, ns = dummy, dummy
    bias = dummy if bias is None else bias.to(x.dtype).contiguous()

    _check_device(x)

    # ---- allocate ----
    if out is None:
        y = torch.empty((B, C_out, H_out, W_out), dtype=x.dtype, device=x.device)
    else:
        if tuple(out.shape) != (B, C_out, H_out, W_out) or out.dtype != x.dtype \
                or not out.is_contiguous() or out.device != x.device:
            raise ValueError(f"modulated_conv2d_triton: out must be a contiguous {x.dtype} tensor "
                             f"[{B}, {C_out}, {H_out}, {W_out}] on {x.device}, got {tuple(out.shape)} "
                             f"{out.dtype} on {out.device}")
        y = out

    # ---- launch ----
    def grid(meta):
        return (triton.cdiv(H_out * W_out, meta["BLOCK_M"]), triton.cdiv(C_out, meta["BLOCK_N"]), B)

    args = (x, weight, style, noise, ns, bias, C_in, C_out, H, W, H_out, W_out, y)
    constexprs = dict(KSIZE=k, DILATION=int(dilation), PADDING=int(padding),
                      DEMODULATE=bool(demodulate), HAS_NOISE=has_noise, HAS_BIAS=has_bias,
                      ACTIVATE=bool(activate), TF32X3=x.dtype == torch.float32)
    if config is None:
        autotuned_kernel()[grid](*args, **constexprs)
    else:
        jit_kernel()[grid](*args, **constexprs, **config)
    return y

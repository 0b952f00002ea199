"""Fused modulated (dilated) convolution: the public function and the reference that defines it.

Per sample b, with x [B, Cin, H, W], an already-scaled weight [Cout, Cin, k, k] and a style
[B, Cin]:

    y_b = act(demod_b * conv(x_b * style_b, weight, dilation, padding)
              + noise_strength * noise_b + bias)
    demod_b[o] = rsqrt(sum_{i,kh,kw} (weight[o, i, kh, kw] * style_b[i])^2 + 1e-8)
    act(v) = leaky_relu(v, 0.2) * sqrt(2)

Modulating the input instead of the weight is the same maths as StyleGAN2's per-sample weights
with a grouped convolution (groups = B), but the weight stays shared across the batch, so the op
exports to ONNX with a dynamic batch and maps onto one implicit GEMM. The demodulation sum is
factorised as (style^2) @ sum_k(weight^2)^T, an exact rewrite of the same sum.

Every stride-1 modulated conv of the StyleGANEX generator is this op: the plain 3x3 convs, the
1x1 ToRGB convs (demodulate=False, activate=False), and the dilated "upsampling" convs of the
shallow layers (a transposed conv at stride 1 is a conv with the flipped, in/out-swapped weight;
see `transposed_to_conv_weight`).

`impl` picks the implementation; nothing falls back silently:
  "reference"  plain PyTorch below (any device, any dtype, exports to standard ONNX ops)
  "triton"     the fused kernel in modconv_triton.py (CUDA, or CPU under TRITON_INTERPRET=1)
  "auto"       "triton" for CUDA tensors when Triton imports, else "reference"; logs its choice
  "plugin"     the custom op torch.ops.sgex.fused_modconv (kernels/onnx_op.py): computes the
               reference eagerly, and the dynamo ONNX exporter with
               onnx_op.onnx_translation_table() writes it as ONE FusedModulatedConv2d node
               (ONNX Runtime: onnxruntime-extensions op; TensorRT: plugin in trt_plugin.py)
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

__all__ = [
    "modulated_conv2d",
    "modulated_conv2d_reference",
    "transposed_to_conv_weight",
    "demodulation",
    "LRELU_SLOPE",
    "LRELU_GAIN",
    "DEMOD_EPS",
]

log = logging.getLogger(__name__)

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)
DEMOD_EPS = 1e-8

IMPLS = ("reference", "triton", "auto", "plugin")
_auto_logged: set[str] = set()


def transposed_to_conv_weight(weight_t: torch.Tensor) -> torch.Tensor:
    """Weight of a stride-1 transposed conv [Cin, Cout, k, k] -> the equivalent conv weight
    [Cout, Cin, k, k] (in/out swapped, spatially flipped). With dilation d and transposed-conv
    padding p, the equivalent conv has padding d*(k-1) - p."""
    return weight_t.transpose(0, 1).flip(2, 3)


def demodulation(weight: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """demod [B, Cout] = rsqrt(sum over (Cin, k, k) of (weight * style)^2 + 1e-8).

    weight [Cout, Cin, k, k], style [B, Cin]. Computed in style's dtype: an FP32 style with FP16
    weights (the FP16 path's FP32 islands) gives an FP32 sum, where FP16 would overflow."""
    if weight.dtype != style.dtype:
        weight = weight.to(style.dtype)
    wsq = weight.square().sum(dim=(2, 3))  # [Cout, Cin]
    return torch.rsqrt(style.square() @ wsq.t() + DEMOD_EPS)  # [B, Cout]


def modulated_conv2d_reference(
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
) -> torch.Tensor:
    """The definition of the op in plain PyTorch. Shapes as in `modulated_conv2d`. A style of
    another dtype than x (FP32 styles with FP16 features) modulates in x's dtype and demodulates
    in style's, as the Triton kernel does."""
    k = weight.shape[-1]
    if padding is None:
        padding = dilation * (k - 1) // 2
    xstyle = style if style.dtype == x.dtype else style.to(x.dtype)
    y = F.conv2d(x * xstyle[:, :, None, None], weight, padding=padding, dilation=dilation)
    if demodulate:
        demod = demodulation(weight, style)
        y = y * (demod if demod.dtype == y.dtype else demod.to(y.dtype))[:, :, None, None]
    if noise is not None:
        y = y + (1.0 if noise_strength is None else noise_strength) * noise
    if bias is not None:
        y = y + bias[None, :, None, None]
    if activate:
        y = F.leaky_relu(y, LRELU_SLOPE) * LRELU_GAIN
    return y


def _check_shapes(x, weight, style, noise, bias) -> None:
    if x.ndim != 4 or weight.ndim != 4 or style.ndim != 2:
        raise ValueError(
            f"modulated_conv2d: expected x [B,Cin,H,W], weight [Cout,Cin,k,k], style [B,Cin]; "
            f"got x {tuple(x.shape)}, weight {tuple(weight.shape)}, style {tuple(style.shape)}"
        )
    if weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"modulated_conv2d: square kernels only, got {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1] or style.shape[1] != weight.shape[1]:
        raise ValueError(
            f"modulated_conv2d: Cin mismatch: x {x.shape[1]}, weight {weight.shape[1]}, "
            f"style {style.shape[1]}"
        )
    if style.shape[0] != x.shape[0]:
        raise ValueError(f"modulated_conv2d: batch mismatch: x {x.shape[0]}, style {style.shape[0]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"modulated_conv2d: bias must be [Cout]={weight.shape[0]}, got {tuple(bias.shape)}")
    if noise is not None and (noise.ndim != 4 or noise.shape[1] != 1):
        raise ValueError(f"modulated_conv2d: noise must be [B,1,H,W], got {tuple(noise.shape)}")


def _resolve_impl(impl: str, x: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"modulated_conv2d: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    chosen = "reference"
    if x.is_cuda:
        try:
            import triton  # noqa: F401

            chosen = "triton"
        except ImportError:
            chosen = "reference"
    key = f"{x.device.type}:{chosen}"
    if key not in _auto_logged:
        _auto_logged.add(key)
        log.info("modulated_conv2d impl=auto chose %r for %s tensors", chosen, x.device.type)
    return chosen


def _plugin_call(x, weight, style, *, demodulate, dilation, padding, noise, noise_strength,
                 bias, activate) -> torch.Tensor:
    from kernels.onnx_op import torch_op

    if padding is None:
        padding = dilation * (weight.shape[-1] - 1) // 2
    if noise is not None and not isinstance(noise_strength, torch.Tensor):
        # The op takes the gain as a tensor; a Python float becomes a [1] constant in style's dtype.
        noise_strength = torch.full((1,), 1.0 if noise_strength is None else float(noise_strength),
                                    dtype=style.dtype, device=x.device)
    if noise is None:
        noise_strength = None
    else:
        # The node's type constraints: noise like x (T), the gain like style (S).
        noise, noise_strength = noise.to(x.dtype), noise_strength.to(style.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    return torch_op()(x, weight, style, noise, noise_strength, bias, int(dilation), int(padding),
                      bool(demodulate), bool(activate))


def modulated_conv2d(
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
    impl: str = "reference",
) -> torch.Tensor:
    """Fused modulated convolution at stride 1.

    Args:
        x: [B, Cin, H, W] input features.
        weight: [Cout, Cin, k, k] conv weight, already multiplied by its equalized-lr scale.
        style: [B, Cin] per-sample modulation.
        demodulate: apply the per-sample, per-output-channel demodulation.
        dilation, padding: of the conv; padding defaults to "same" (dilation * (k-1) // 2).
        noise: [B, 1, Ho, Wo] added after demodulation, scaled by noise_strength (scalar).
        bias: [Cout] added before the activation.
        activate: leaky ReLU(0.2) times sqrt(2).
        impl: "reference" | "triton" | "auto" | "plugin" (see module docstring).

    Returns:
        [B, Cout, Ho, Wo] in x's dtype.
    """
    _check_shapes(x, weight, style, noise, bias)
    chosen = _resolve_impl(impl, x)
    kwargs = dict(
        demodulate=demodulate, dilation=dilation, padding=padding, noise=noise,
        noise_strength=noise_strength, bias=bias, activate=activate,
    )
    if chosen == "triton":
        try:
            from kernels.modconv_triton import modulated_conv2d_triton
        except ImportError as e:
            raise RuntimeError(
                "modulated_conv2d(impl='triton') needs Triton: pip install -c constraints.txt "
                "'sgex[triton]'"
            ) from e
        return modulated_conv2d_triton(x, weight, style, **kwargs)
    if chosen == "plugin":
        return _plugin_call(x, weight, style, **kwargs)
    return modulated_conv2d_reference(x, weight, style, **kwargs)

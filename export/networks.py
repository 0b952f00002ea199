"""StyleGANEX (ICCV 2023) in PyTorch: the reference model every sgex artifact is derived from.

Facts: spec/styleganex.md (sections cited as "spec x.y"). Module and parameter names equal the
official pSp state_dict keys (`encoder.*`, `decoder.*`), so checkpoint loading is a 1:1 table
(export/checkpoint.py). Constant buffers of the official code (blur kernels, fixed noise,
BatchNorm `num_batches_tracked`) are rebuilt here as non-persistent buffers, never loaded.

Three formulations of the generator's modulated convolutions, picked by `impl` (no fallback):

* "reference" / "triton" / "auto" / "plugin": every stride-1 modulated conv (plain 3x3, 1x1 ToRGB
  and the dilated transposed "up"-convs of convs.0/2/4, rewritten as blur + ordinary dilated
  conv) goes through `kernels.modconv.modulated_conv2d(..., impl=impl)` with the weight shared
  across the batch. The stride-2 up-convs (convs.6, 8, ...) modulate the input, run one shared
  conv_transpose2d, demodulate, then blur. Exports to ONNX with dynamic batch/height/width.
* "official": the research-code formulation (per-sample weights, grouped convs with groups=B,
  conv_transpose2d for the dilated up-convs with the blur as in spec 1.4, upfirdn2d as pad+conv).
  Used by `StyleGANEX.forward_official`, the parity oracle and benchmark baseline.

Sizes (spec 5): x1 [B,C,H,W] with H, W multiples of 8 (sgex pads only sides that are not) -> f [B,512,H/8,W/8]
-> output [B,3,4H,4W]. Channel counts are divided by `ModelConfig.width_div` (tiny test models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.modconv import (
    DEMOD_EPS,
    LRELU_GAIN,
    LRELU_SLOPE,
    demodulation,
    modulated_conv2d,
    transposed_to_conv_weight,
)
from runtime.tasks import INJECT_ROWS, INJECT_SCALE, N_LATENT, N_NOISE, WIDTH_DIVS

__all__ = [
    "ModelConfig",
    "StyleGANEX",
    "Generator",
    "GradualStyleEncoder",
    "MODCONV_IMPLS",
    "N_LATENT",
    "N_NOISE",
    "upfirdn2d_native",
    "blur3_kernel",
    "blur4_kernel",
]

BN_EPS = 1e-5
IN_EPS = 1e-5  # InstanceNorm2d default (fusion attention AdaIN)
ENC_SLOPE = 0.01  # nn.LeakyReLU() default: style heads, fusion transform, T
ATT_SLOPE = 0.2  # fusion attention MLP
INJECT_ROW = INJECT_ROWS[0]  # translate: rows 8..17 <- 0.7 * mapping(z)
MODCONV_IMPLS = ("reference", "triton", "auto", "plugin", "official")
# Norm modes of the encoder's BatchNorms: "running" = eval BN (stored statistics); "sample" =
# per-sample statistics (official train-mode BN on a batch of one, made per sample); "train1" =
# the same computed with F.batch_norm(training=True) one sample at a time (official oracle).
NORM_MODES = ("running", "sample", "train1")

# Generator channels per nominal resolution (channel_multiplier 2), spec 1.1.
G_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}
# IR-SE-50: (in depth, depth, units), each block's first unit has stride 2 (spec 2.2).
IRSE50_BLOCKS = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))
TAP_UNITS = {2: "c128", 6: "c1", 10: "c21", 15: "c22", 20: "c2", 23: "c3"}
# Fusion layer k: (encoder channels, generator channels) and its encoder tap (spec 2.5).
FUSION_CHANNELS = ((256, 512), (256, 512), (256, 512), (256, 512), (128, 512), (64, 256), (64, 128))
FUSION_TAPS = ("c2", "c2", "c22", "c21", "c1", "c128", "c256")
HEAD_CONVS = (4,) * 3 + (5,) * 4 + (6,) * 11  # stride-2 convs of style heads 0..17 (log2 of 16/32/64)
SE_REDUCTION = 16


@dataclass(frozen=True)
class ModelConfig:
    """One StyleGANEX configuration (spec 2.5, 3.3)."""

    n_fusion: int = 0  # L, number of encoder.fusion layers (0..7)
    use_att: int = 0  # fusion attention MLP depth (0 = none)
    skip_torgb: bool = False  # fusion_skip convs present
    label_nc: int = 0  # 0: RGB encoder input; 1 sketch; 19 mask (T network present)
    width_div: int = 1  # 1 = official sizes; every channel count is divided by it

    def __post_init__(self):
        if not 0 <= self.n_fusion <= 7:
            raise ValueError(f"n_fusion must be 0..7, got {self.n_fusion}")
        if self.use_att < 0 or (self.use_att and not self.n_fusion):
            raise ValueError(f"use_att={self.use_att} needs fusion layers (n_fusion={self.n_fusion})")
        if self.label_nc not in (0, 1, 19):
            raise ValueError(f"label_nc must be 0, 1 or 19, got {self.label_nc}")
        # SE reduction 16 needs >= 16 channels at depth 64: width_div <= 4.
        if self.width_div not in WIDTH_DIVS:
            raise ValueError(f"width_div must be one of {WIDTH_DIVS}, got {self.width_div}")

    @property
    def style_dim(self) -> int:
        return 512 // self.width_div

    def ch(self, c: int) -> int:
        return c // self.width_div


# --------------------------------------------------------------------------------------------
# Small ops


def _lrelu_bias(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """FusedLeakyReLU: leaky_relu(x + bias[c], 0.2) * sqrt(2)."""
    return F.leaky_relu(x + bias.view(1, -1, 1, 1), LRELU_SLOPE) * LRELU_GAIN


def blur3_kernel() -> torch.Tensor:
    """[1,1,3,3] = outer([1,2,1],[1,2,1]) / 16, gain 1 (the dilated emulation, spec 1.4)."""
    k = torch.tensor([1.0, 2.0, 1.0])
    return (k[:, None] * k[None, :] / 16.0)[None, None]


def blur4_kernel(gain: float) -> torch.Tensor:
    """[1,1,4,4] = outer([1,3,3,1]) / 64 * gain (rosinality make_kernel; gain 4 when upsampling)."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    return (k[:, None] * k[None, :] / 64.0 * gain)[None, None]


def upfirdn2d_native(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
                     pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """rosinality's pure-PyTorch upfirdn2d (zero-insert by `up`, pad (pad0, pad1) on both axes,
    correlate with the flipped 2-D `kernel`, keep every `down`-th sample). x [B,C,H,W]."""
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    out = x.reshape(b * c, h, 1, w, 1)
    out = F.pad(out, [0, up - 1, 0, 0, 0, up - 1])
    out = out.reshape(b * c, 1, h * up, w * up)
    p0, p1 = pad
    out = F.pad(out, [p0, p1, p0, p1])
    out = F.conv2d(out, torch.flip(kernel, [0, 1]).view(1, 1, kh, kw).to(out))
    out = out[:, :, ::down, ::down]
    return out.reshape(b, c, out.shape[-2], out.shape[-1])


def _check(t: torch.Tensor, name: str, shape: tuple) -> None:
    """Shape contract on the static dims only (None = any), so it survives export with dynamic
    batch/height/width."""
    if t.ndim != len(shape) or any(s is not None and t.shape[i] != s for i, s in enumerate(shape)):
        want = ",".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name}: expected shape [{want}], got {list(t.shape)}")


def _depthwise(kernel: torch.Tensor, channels: int) -> torch.Tensor:
    return kernel.expand(channels, 1, kernel.shape[-2], kernel.shape[-1])


# --------------------------------------------------------------------------------------------
# Generator (decoder): rosinality StyleGAN2 + the StyleGANEX changes (spec 1)


class PixelNorm(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Equalized-lr linear: weight stored unscaled (randn / lr_mul), used * lr_mul / sqrt(in)."""

    def __init__(self, in_dim: int, out_dim: int, lr_mul: float = 1.0, activation: bool = False,
                 bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_dim))
        self.lr_mul = lr_mul
        self.scale = lr_mul / math.sqrt(in_dim)
        self.activation = activation
        self.bias_init = bias_init

    def forward(self, x):
        y = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(y, LRELU_SLOPE) * LRELU_GAIN if self.activation else y


class ModulatedConv2d(nn.Module):
    """Parameters of one modulated conv: weight [1,Cout,Cin,k,k] (randn, scaled by
    1/sqrt(Cin*k*k) at run time) and modulation = EqualLinear(style_dim, Cin, bias_init=1).

    kind: "plain" (stride 1, dilation d, padding d*(k-1)/2), "dilated_up" (spec 1.4, d = 8/4/2)
    or "up2" (stride-2 transposed conv + [1,3,3,1] blur)."""

    def __init__(self, cin: int, cout: int, k: int, style_dim: int, *, demodulate: bool = True,
                 upsample: bool = False, dilation: int = 1):
        super().__init__()
        self.cin, self.cout, self.k = cin, cout, k
        self.demodulate = demodulate
        self.dilation = dilation
        self.kind = "plain" if not upsample else ("dilated_up" if dilation > 1 else "up2")
        self.scale = 1.0 / math.sqrt(cin * k * k)
        self.weight = nn.Parameter(torch.empty(1, cout, cin, k, k))
        self.modulation = EqualLinear(style_dim, cin, bias_init=1.0)
        if self.kind == "dilated_up":
            self.register_buffer("blur3", blur3_kernel(), persistent=False)
        if self.kind == "up2":
            self.register_buffer("blur4", blur4_kernel(4.0)[0, 0], persistent=False)

    def conv_weight(self) -> torch.Tensor:
        """[Cout, Cin, k, k], the equalized-lr scale applied."""
        return self.weight[0] * self.scale

    def run(self, x: torch.Tensor, w: torch.Tensor, impl: str, *, noise=None, noise_strength=None,
            bias=None, activate=False) -> torch.Tensor:
        """x [B,Cin,h,w], w [B,style_dim] -> [B,Cout,h',w'] (noise, bias, activation fused)."""
        style = self.modulation(w)  # [B, Cin]
        if impl == "official":
            y = self._official(x, style)
            if noise is not None:
                y = y + noise_strength * noise
            if bias is not None:
                y = _lrelu_bias(y, bias) if activate else y + bias.view(1, -1, 1, 1)
            return y
        weight = self.conv_weight()
        kw = dict(demodulate=self.demodulate, noise=noise, noise_strength=noise_strength, bias=bias,
                  activate=activate, impl=impl)
        if self.kind == "plain":
            d = self.dilation
            return modulated_conv2d(x, weight, style, dilation=d, padding=d * (self.k - 1) // 2, **kw)
        if self.kind == "dilated_up":
            # conv_transpose2d(blur, stride 1, pad 0, dil d/2) == conv2d(pad d, dil d/2) for the
            # symmetric blur; the transposed conv (pad d, dil d/2) == conv2d with the flipped,
            # in/out-swapped weight and padding (d/2)*(3-1) - d = 0.
            d = self.dilation
            xb = F.conv2d(x, _depthwise(self.blur3, self.cin), padding=d, dilation=d // 2, groups=self.cin)
            wconv = transposed_to_conv_weight(weight.transpose(0, 1))
            return modulated_conv2d(xb, wconv, style, dilation=d // 2, padding=0, **kw)
        # up2: the stride-2 transposed conv is not the stride-1 op. Demodulation (per sample and
        # output channel) commutes with the depthwise blur, so it is applied before it.
        xstyle = style if style.dtype == x.dtype else style.to(x.dtype)  # FP32 styles, FP16 x
        y = F.conv_transpose2d(x * xstyle[:, :, None, None], weight.transpose(0, 1), stride=2)
        if self.demodulate:
            demod = demodulation(weight, style)
            y = y * (demod if demod.dtype == y.dtype else demod.to(y.dtype))[:, :, None, None]
        y = F.conv2d(y, _depthwise(self.blur4[None, None], self.cout), padding=1, groups=self.cout)
        if noise is not None:
            y = y + noise_strength * noise
        if bias is not None:
            y = _lrelu_bias(y, bias) if activate else y + bias.view(1, -1, 1, 1)
        return y

    def _official(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """The research-code formulation: per-sample weights, grouped convs (groups=B)."""
        b, cin, h, w = x.shape
        k, cout = self.k, self.cout
        weight = self.scale * self.weight * style.view(b, 1, cin, 1, 1)  # [B,Cout,Cin,k,k]
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + DEMOD_EPS)
            weight = weight * demod.view(b, cout, 1, 1, 1)
        if self.kind == "plain":
            d = self.dilation
            out = F.conv2d(x.reshape(1, b * cin, h, w), weight.reshape(b * cout, cin, k, k),
                           padding=(k - 1) // 2 * d, groups=b, dilation=d)
            return out.reshape(b, cout, out.shape[-2], out.shape[-1])
        wt = weight.transpose(1, 2).reshape(b * cin, cout, k, k)
        xi = x.reshape(1, b * cin, h, w)
        if self.kind == "dilated_up":
            d = self.dilation
            xb = F.conv_transpose2d(xi, self.blur3.repeat(b * cin, 1, 1, 1), padding=0,
                                    groups=b * cin, dilation=d // 2)
            out = F.conv_transpose2d(xb, wt, padding=d, groups=b, dilation=d // 2)
            return out.reshape(b, cout, out.shape[-2], out.shape[-1])
        out = F.conv_transpose2d(xi, wt, padding=0, stride=2, groups=b)
        out = out.reshape(b, cout, out.shape[-2], out.shape[-1])
        return upfirdn2d_native(out, self.blur4, pad=(1, 1))


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1))


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(channels))


class StyledConv(nn.Module):
    """ModulatedConv2d -> NoiseInjection -> FusedLeakyReLU (keys conv.*, noise.weight, activate.bias)."""

    def __init__(self, cin, cout, k, style_dim, *, upsample=False, dilation=1):
        super().__init__()
        self.conv = ModulatedConv2d(cin, cout, k, style_dim, upsample=upsample, dilation=dilation)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(cout)

    def forward(self, x, w, noise=None, impl="reference"):
        """noise None: no noise op (zero noise); else [B,1,h,w] at the output size."""
        return self.conv.run(x, w, impl, noise=noise, noise_strength=self.noise.weight if noise is not None else None,
                             bias=self.activate.bias, activate=True)


class ToRGB(nn.Module):
    """1x1 modulated conv (no demodulation) + bias [1,3,1,1] + the resampled skip image.

    skip: "none" (to_rgb1), "blur" (to_rgbs.0/1/2: dilated 3x3 blur, spec 1.5) or "up"
    (upfirdn2d up 2, pad (2,1), kernel outer([1,3,3,1])/64*4)."""

    def __init__(self, cin, style_dim, *, skip: str, dilation: int = 1):
        super().__init__()
        self.conv = ModulatedConv2d(cin, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.empty(1, 3, 1, 1))
        self.skip_mode = skip
        self.dilation = dilation
        if skip == "blur":
            self.register_buffer("blur3", blur3_kernel(), persistent=False)
        if skip == "up":
            self.register_buffer("up_kernel", blur4_kernel(4.0)[0, 0], persistent=False)

    def upsample_skip(self, skip: torch.Tensor, impl: str) -> torch.Tensor:
        """[B,3,h,w] -> [B,3,2h,2w]. upfirdn2d(up=2, pad=(2,1)) == depthwise conv_transpose2d
        with stride 2 and padding 1 (zero insertion + pad k-1-p = 2 each side, the trailing
        inserted zero standing for the pad1 = 1 side); the kernel is symmetric."""
        if impl == "official":
            return upfirdn2d_native(skip, self.up_kernel, up=2, pad=(2, 1))
        return F.conv_transpose2d(skip, _depthwise(self.up_kernel[None, None], 3), stride=2, padding=1, groups=3)

    def forward(self, x, w, skip=None, impl="reference"):
        y = self.conv.run(x, w, impl, bias=self.bias.view(3), activate=False)
        if skip is not None:
            if self.skip_mode == "blur":
                d = self.dilation // 2
                skip = F.conv2d(skip, _depthwise(self.blur3, 3), padding=d, dilation=d, groups=3)
            elif self.skip_mode == "up":
                skip = self.upsample_skip(skip, impl)
            y = y + skip
        return y


class ConstantInput(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.input = nn.Parameter(torch.empty(1, channels, 4, 4))


class Generator(nn.Module):
    """StyleGANEX generator at output_size 1024 (18 latents, 17 noise layers); spec 1.3 table."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.style_dim
        ch = {r: cfg.ch(c) for r, c in G_CHANNELS.items()}
        self.style_dim = d
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(d, d, lr_mul=0.01, activation=True) for _ in range(8)])
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, d, dilation=8)
        self.to_rgb1 = ToRGB(ch[4], d, skip="none")
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        cin = ch[4]
        for i in range(3, 11):
            cout = ch[2 ** i]
            d_up = max(1, 32 // 2 ** (i - 1))
            self.convs.append(StyledConv(cin, cout, 3, d, upsample=True, dilation=d_up))
            self.convs.append(StyledConv(cout, cout, 3, d, dilation=max(1, 32 // 2 ** i)))
            self.to_rgbs.append(ToRGB(cout, d, skip="blur" if d_up > 1 else "up", dilation=d_up))
            cin = cout

    def forward(self, wplus, f=None, enc_feats=None, fusion=None, att_cond=None, noises=None,
                impl="reference", collect=None):
        """wplus [B,18,D] (editing_w already added); f [B,C4,F,F'] or None (constant path:
        4x4 constant upsampled x8 nearest, F=32); enc_feats: the fusion taps in order; fusion:
        encoder.fusion (applied before block k's first conv while k < L); att_cond [B,18,D] or
        None (row 2k+1 conditions fusion k); noises: None or 17 maps [B,1,h_j,w_j].
        collect: optional list that receives (name, tensor) per layer (tests).
        Returns the image [B,3,32F,32F'] (unclamped)."""
        if f is None:
            c = self.input.input
            out = F.interpolate(c, scale_factor=8, mode="nearest").expand(wplus.shape[0], -1, -1, -1)
        else:
            out = f

        def nz(j):
            return None if noises is None else noises[j]

        out = self.conv1(out, wplus[:, 0], nz(0), impl)
        skip = self.to_rgb1(out, wplus[:, 1], None, impl)
        if collect is not None:
            collect += [("conv1", out), ("to_rgb1", skip)]
        n_fusion = 0 if fusion is None else len(fusion)
        for k in range(8):
            i = 2 * k + 1
            if k < n_fusion:
                cond = None if att_cond is None else att_cond[:, i]
                out, skip = fusion[k](enc_feats[k], out, skip, cond)
            out = self.convs[2 * k](out, wplus[:, i], nz(2 * k + 1), impl)
            if collect is not None:
                collect.append((f"convs.{2 * k}", out))
            out = self.convs[2 * k + 1](out, wplus[:, i + 1], nz(2 * k + 2), impl)
            skip = self.to_rgbs[k](out, wplus[:, i + 2], skip, impl)
            if collect is not None:
                collect += [(f"convs.{2 * k + 1}", out), (f"to_rgbs.{k}", skip)]
        return skip


# --------------------------------------------------------------------------------------------
# Encoder: IR-SE-50 GradualStyleEncoder with the StyleGANEX taps, f, fusion and T (spec 2)


class BatchNorm(nn.Module):
    """BatchNorm2d (eps 1e-5) with the norm mode chosen per call (see NORM_MODES). Keys weight,
    bias, running_mean, running_var; num_batches_tracked is not kept (unused at inference)."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c))
        self.bias = nn.Parameter(torch.empty(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x, mode: str):
        if mode == "running":
            scale = self.weight * torch.rsqrt(self.running_var + BN_EPS)
            return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(1, -1, 1, 1)
        if mode == "sample":
            mean = x.mean(dim=(2, 3), keepdim=True)
            xc = x - mean
            var = xc.square().mean(dim=(2, 3), keepdim=True)  # biased, as BN in train mode
            return xc * torch.rsqrt(var + BN_EPS) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if mode == "train1":
            return torch.cat([F.batch_norm(x[i:i + 1], None, None, self.weight, self.bias, training=True, eps=BN_EPS)
                              for i in range(x.shape[0])])
        raise ValueError(f"unknown norm mode {mode!r}")


def _run(layers, x, mode):
    for m in layers:
        x = m(x, mode) if isinstance(m, BatchNorm) else m(x)
    return x


class SEModule(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // SE_REDUCTION, 1, bias=False)
        self.fc2 = nn.Conv2d(c // SE_REDUCTION, c, 1, bias=False)

    def forward(self, x):
        s = x.mean(dim=(2, 3), keepdim=True)  # global average pool
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class BottleneckIRSE(nn.Module):
    """res = BN -> conv3x3 -> PReLU -> conv3x3(stride) -> BN -> SE; shortcut = MaxPool(1, stride)
    when in == depth, else conv1x1(stride) + BN."""

    def __init__(self, cin: int, depth: int, stride: int):
        super().__init__()
        self.stride = stride
        self.shortcut_layer = None if cin == depth else nn.ModuleList(
            [nn.Conv2d(cin, depth, 1, stride, bias=False), BatchNorm(depth)])
        self.res_layer = nn.ModuleList([
            BatchNorm(cin), nn.Conv2d(cin, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), BatchNorm(depth), SEModule(depth)])

    def forward(self, x, mode):
        sc = F.max_pool2d(x, 1, self.stride) if self.shortcut_layer is None else _run(self.shortcut_layer, x, mode)
        return _run(self.res_layer, x, mode) + sc


class GradualStyleBlock(nn.Module):
    """n x (conv3x3 stride 2 + LeakyReLU 0.01) -> global average pool -> EqualLinear."""

    def __init__(self, c: int, n_convs: int):
        super().__init__()
        layers = []
        for _ in range(n_convs):
            layers += [nn.Conv2d(c, c, 3, 2, 1), nn.LeakyReLU(ENC_SLOPE)]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(c, c, lr_mul=1.0)

    def forward(self, x):
        return self.linear(self.convs(x).mean(dim=(2, 3)))


class FusionLayer(nn.Module):
    """Skip fusion of encoder tap `feat` into the generator (out, skip), spec 2.5."""

    def __init__(self, inc: int, outc: int, style_dim: int, use_att: int, skip_torgb: bool):
        super().__init__()
        self.transform = nn.Sequential(nn.Conv2d(inc, outc, 3, 1, 1), nn.LeakyReLU(ENC_SLOPE))
        self.fusion_out = nn.Conv2d(2 * outc, outc, 3, 1, 1)
        self.skip_torgb = skip_torgb
        if skip_torgb:
            self.fusion_skip = nn.Conv2d(3 + outc, 3, 3, 1, 1)
        self.use_att = use_att
        if use_att:
            layers = [nn.Linear(style_dim, outc)]
            for _ in range(use_att):
                layers += [nn.LeakyReLU(ATT_SLOPE), nn.Linear(outc, outc)]
            layers.append(nn.LeakyReLU(ATT_SLOPE))
            self.linear = nn.Sequential(*layers)
            self.norm = AdaIN(2 * outc, outc)
            self.conv = nn.Conv2d(2 * outc, 1, 3, 1, 1)

    def forward(self, feat, out, skip, cond=None):
        x = self.transform(feat)
        if self.use_att and cond is not None:
            label = self.linear(cond)
            m = torch.tanh(F.relu(self.conv(self.norm(torch.cat([out, (out - x).abs()], 1), label))))
            x = x * m
        out = self.fusion_out(torch.cat([out, x], 1))
        if self.skip_torgb:
            skip = self.fusion_skip(torch.cat([skip, x], 1))
        return out, skip


class AdaIN(nn.Module):
    """InstanceNorm2d(affine=False, eps 1e-5) then gamma * x + beta, (gamma, beta) = style(label)."""

    def __init__(self, c: int, label_dim: int):
        super().__init__()
        self.style = nn.Linear(label_dim, 2 * c)

    def forward(self, x, label):
        gamma, beta = self.style(label)[:, :, None, None].chunk(2, 1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        xc = x - mean
        xn = xc * torch.rsqrt(xc.square().mean(dim=(2, 3), keepdim=True) + IN_EPS)
        return gamma * xn + beta


class ResnetBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(ENC_SLOPE), nn.Conv2d(c, c, 3, 1, 1))

    def forward(self, x):
        return F.leaky_relu(x + self.conv_block(x), ENC_SLOPE)


class TranslationNet(nn.Module):
    """T (`input_label_layer`, ResnetGenerator with res_num=2): [B,label_nc,H,W] -> [B,64,H,W]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, o = cfg.ch(16), cfg.ch(64)
        self.model = nn.ModuleList([
            nn.Conv2d(cfg.label_nc, c, 3, 2, 1), nn.LeakyReLU(ENC_SLOPE),
            nn.Conv2d(c, c, 3, 2, 1), nn.LeakyReLU(ENC_SLOPE),
            ResnetBlock(c), ResnetBlock(c),
            nn.ConvTranspose2d(c, c, 3, 2, 1, output_padding=1), nn.LeakyReLU(ENC_SLOPE),
            nn.ConvTranspose2d(c, c, 3, 2, 1, output_padding=1), nn.LeakyReLU(ENC_SLOPE),
            nn.Conv2d(c, o, 3, 1, 1, bias=False), BatchNorm(o), nn.PReLU(o)])

    def forward(self, x, mode):
        return _run(self.model, x, mode)


class GradualStyleEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = cfg.ch
        if cfg.label_nc:
            self.input_label_layer = TranslationNet(cfg)
        self.input_layer = nn.ModuleList(
            [nn.Conv2d(3, ch(64), 3, 1, 1, bias=False), BatchNorm(ch(64)), nn.PReLU(ch(64))])
        units = []
        for cin, depth, n in IRSE50_BLOCKS:
            units.append(BottleneckIRSE(ch(cin), ch(depth), 2))
            units += [BottleneckIRSE(ch(depth), ch(depth), 1) for _ in range(n - 1)]
        self.body = nn.ModuleList(units)
        self.styles = nn.ModuleList([GradualStyleBlock(ch(512), n) for n in HEAD_CONVS])
        self.latlayer1 = nn.Conv2d(ch(256), ch(512), 1)
        self.latlayer2 = nn.Conv2d(ch(128), ch(512), 1)
        self.featlayer = nn.Conv2d(ch(768), ch(512), 1)
        self.skiplayer = nn.Conv2d(ch(768), 3, 1)
        if cfg.n_fusion:
            self.fusion = nn.ModuleList([
                FusionLayer(ch(i), ch(o), cfg.style_dim, cfg.use_att, cfg.skip_torgb)
                for i, o in FUSION_CHANNELS[:cfg.n_fusion]])
        else:
            self.fusion = None

    def taps(self, x, mode: str, last_unit: int = 23) -> dict:
        """Input stage + body units 0..last_unit. Returns {"c256", "c128", "c1", "c21", "c22",
        "c2", "c3"} (those reached). x [B,3,H,W] RGB, or [B,label_nc,H,W] through T."""
        if x.shape[1] != 3:
            x = self.input_label_layer(x, mode)
        else:
            x = _run(self.input_layer, x, mode)
        t = {"c256": x}
        for i in range(last_unit + 1):
            x = self.body[i](x, mode)
            if i in TAP_UNITS:
                t[TAP_UNITS[i]] = x
        return t

    def codes(self, t: dict) -> torch.Tensor:
        """The 18 style heads on the FPN (bilinear, align_corners=True) -> [B,18,D]."""
        c3 = t["c3"]
        lat = [self.styles[j](c3) for j in range(3)]
        p2 = F.interpolate(c3, size=t["c2"].shape[-2:], mode="bilinear", align_corners=True) + self.latlayer1(t["c2"])
        lat += [self.styles[j](p2) for j in range(3, 7)]
        p1 = F.interpolate(p2, size=t["c1"].shape[-2:], mode="bilinear", align_corners=True) + self.latlayer2(t["c1"])
        lat += [self.styles[j](p1) for j in range(7, 18)]
        return torch.stack(lat, dim=1)

    def first_feature(self, t: dict) -> torch.Tensor:
        """f = featlayer(cat[c21, c22, c2]) [B,C4,H/8,W/8]."""
        return self.featlayer(torch.cat([t["c21"], t["c22"], t["c2"]], 1))

    def fusion_feats(self, t: dict) -> list:
        n = 0 if self.fusion is None else len(self.fusion)
        return [t[name] for name in FUSION_TAPS[:n]]


# --------------------------------------------------------------------------------------------
# The pSp wrapper


class StyleGANEX(nn.Module):
    """encoder (GradualStyleEncoder) + decoder (Generator); graphs style / synth / translate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = GradualStyleEncoder(cfg)
        self.decoder = Generator(cfg)
        self.register_buffer("latent_avg", torch.zeros(N_LATENT, cfg.style_dim), persistent=False)
        self.register_buffer("editing_w", None, persistent=False)
        self.modconv_impl = "reference"

    @property
    def style_dim(self) -> int:
        return self.cfg.style_dim

    def set_modconv_impl(self, impl: str) -> "StyleGANEX":
        if impl not in MODCONV_IMPLS:
            raise ValueError(f"modconv impl must be one of {MODCONV_IMPLS}, got {impl!r}")
        self.modconv_impl = impl
        return self

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,D] -> w [B,D] (PixelNorm + 8 EqualLinear, lr_mul 0.01)."""
        return self.decoder.style(z)

    def style(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [B,3,256,256] in [-1,1] -> w+ [B,18,D] = E(x2) + latent_avg (eval BN). Any size
        works (global pooling); 256 is the official aligned face."""
        _check(x2, "x2", (None, 3, None, None))
        return self.encoder.codes(self.encoder.taps(x2, "running")) + self.latent_avg

    def synth(self, x1, wplus, editing_w=None, noises=None):
        """x1 [B,3,H,W] in [-1,1] (H, W multiples of 8; sgex uses 32), wplus [B,18,D],
        editing_w [B,18,D] already scaled or None, noises None (zero noise) or 17 maps
        [B,1,h_j,w_j] (runtime.tasks.noise_shapes) -> y [B,3,4H,4W] unclamped.
        The x1 pass stops at body unit 20 and computes no style heads."""
        _check(x1, "x1", (None, 3, None, None))
        _check(wplus, "wplus", (None, N_LATENT, self.style_dim))
        return self._synthesize(self.encoder.taps(x1, "running", last_unit=20), wplus, editing_w, noises,
                                self.modconv_impl)

    def translate(self, x, z, noises=None):
        """x [B,1,H,W] sketch in [0,1] or [B,19,H,W] one-hot mask; z [B,D] -> y [B,3,4H,4W].
        Encoder BNs use per-sample statistics; w+ = E(x) + latent_avg with rows 8..17 replaced
        by 0.7 * mapping(z)."""
        _check(x, "x", (None, self.cfg.label_nc or 3, None, None))
        _check(z, "z", (None, self.style_dim))
        t = self.encoder.taps(x, "sample")
        wplus = self._inject(self.encoder.codes(t) + self.latent_avg, z)
        return self._synthesize(t, wplus, None, noises, self.modconv_impl)

    def forward_official(self, x1, x2=None, *, z=None, editing_w=None, noises=None):
        """The official recipe as the research code computes it: full x1 encoder pass including
        the 18 style heads (BN in train mode per image for sketch/mask input), E(x2) when given,
        grouped-conv modulated convs and conv_transpose2d dilated up-convs. Same I/O as
        synth (x2 given or RGB) / translate (sketch/mask x1 with z)."""
        label = x1.shape[1] != 3
        mode = "train1" if label else "running"
        t = self.encoder.taps(x1, mode)
        codes = self.encoder.codes(t)
        if x2 is not None:
            codes = self.encoder.codes(self.encoder.taps(x2, "running"))
        codes = codes + self.latent_avg
        if label:
            if z is None:
                raise ValueError("forward_official: sketch/mask input needs z")
            codes = self._inject(codes, z)
        return self._synthesize(t, codes, editing_w, noises, "official")

    def _inject(self, codes, z):
        inject = INJECT_SCALE * self.mapping(z)  # [B, D]
        tail = inject[:, None, :].expand(-1, N_LATENT - INJECT_ROW, -1)
        return torch.cat([codes[:, :INJECT_ROW], tail], dim=1)

    def _synthesize(self, t, wplus, editing_w, noises, impl):
        if noises is not None and len(noises) != N_NOISE:
            raise ValueError(f"noises: expected {N_NOISE} maps, got {len(noises)}")
        if editing_w is not None:
            _check(editing_w, "editing_w", (None, N_LATENT, self.style_dim))
            wplus = wplus + editing_w
        att_cond = editing_w if self.cfg.use_att else None
        return self.decoder(wplus, self.encoder.first_feature(t), self.encoder.fusion_feats(t),
                            self.encoder.fusion, att_cond, noises, impl)

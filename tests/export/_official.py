"""Test-only, independent formulations used as oracles by tests/export/test_networks.py.

Written from the definitions (spec/styleganex.md sections 1.1, 1.10), not from export.networks:
  * `upfirdn2d_def`: upfirdn2d by explicit zero insertion (strided assignment), pad, correlate
    with the flipped kernel.
  * `stylegan2_plain`: rosinality StyleGAN2 synthesis at 4x4 (no dilation), read straight from a
    StyleGANEX state_dict: grouped-conv modulation with per-sample weights, stride-2 transposed
    conv + [1,3,3,1] blur for the up-convs, upfirdn2d skip upsampling. Returns every layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SQRT2 = math.sqrt(2.0)


def upfirdn2d_def(x: torch.Tensor, kernel: torch.Tensor, up: int, pad: tuple[int, int]) -> torch.Tensor:
    """x [B,C,H,W], kernel [kh,kw]: zero-insert by `up` (x at multiples of up), pad (pad0 before,
    pad1 after) on both axes, correlate with the flipped kernel."""
    b, c, h, w = x.shape
    z = x.new_zeros(b, c, h * up, w * up)
    z[:, :, ::up, ::up] = x
    z = F.pad(z, [pad[0], pad[1], pad[0], pad[1]])
    k = torch.flip(kernel, [0, 1])[None, None].to(x)
    out = F.conv2d(z.reshape(b * c, 1, z.shape[-2], z.shape[-1]), k)
    return out.reshape(b, c, out.shape[-2], out.shape[-1])


def blur_kernel_x4() -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    k = torch.outer(k, k)
    return k / k.sum() * 4


def _style(sd, prefix, w):
    weight, bias = sd[prefix + ".modulation.weight"], sd[prefix + ".modulation.bias"]
    return w @ (weight / math.sqrt(weight.shape[1])).t() + bias


def _modconv(sd, prefix, x, w, *, demodulate=True, up=False):
    weight = sd[prefix + ".weight"]  # [1, Cout, Cin, k, k]
    _, cout, cin, k, _ = weight.shape
    b = x.shape[0]
    s = _style(sd, prefix, w)
    wt = weight / math.sqrt(cin * k * k) * s.view(b, 1, cin, 1, 1)
    if demodulate:
        wt = wt * torch.rsqrt(wt.pow(2).sum([2, 3, 4]) + 1e-8).view(b, cout, 1, 1, 1)
    xg = x.reshape(1, b * cin, x.shape[2], x.shape[3])
    if up:
        wt = wt.transpose(1, 2).reshape(b * cin, cout, k, k)
        out = F.conv_transpose2d(xg, wt, stride=2, padding=0, groups=b)
        out = out.reshape(b, cout, out.shape[-2], out.shape[-1])
        return upfirdn2d_def(out, blur_kernel_x4(), up=1, pad=(1, 1))
    out = F.conv2d(xg, wt.reshape(b * cout, cin, k, k), padding=k // 2, groups=b)
    return out.reshape(b, cout, out.shape[-2], out.shape[-1])


def _styled(sd, prefix, x, w, noise, up=False):
    out = _modconv(sd, prefix + ".conv", x, w, up=up)
    if noise is not None:
        out = out + sd[prefix + ".noise.weight"] * noise
    return F.leaky_relu(out + sd[prefix + ".activate.bias"].view(1, -1, 1, 1), 0.2) * SQRT2


def _torgb(sd, prefix, x, w, skip):
    out = _modconv(sd, prefix + ".conv", x, w, demodulate=False) + sd[prefix + ".bias"]
    if skip is not None:
        out = out + upfirdn2d_def(skip, blur_kernel_x4(), up=2, pad=(2, 1))
    return out


def stylegan2_plain(sd: dict, wplus: torch.Tensor, noises=None) -> list[tuple[str, torch.Tensor]]:
    """Plain StyleGAN2 (4x4 constant, nominal resolutions) with the decoder.* weights of a
    StyleGANEX state_dict. noises: None or 17 maps at nominal sizes 4, 8, 8, ..., 1024."""
    sd = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    b = wplus.shape[0]
    nz = (lambda j: None) if noises is None else (lambda j: noises[j])
    out = sd["input.input"].expand(b, -1, -1, -1)
    feats = []
    out = _styled(sd, "conv1", out, wplus[:, 0], nz(0))
    skip = _torgb(sd, "to_rgb1", out, wplus[:, 1], None)
    feats += [("conv1", out), ("to_rgb1", skip)]
    for k in range(8):
        i = 2 * k + 1
        out = _styled(sd, f"convs.{2 * k}", out, wplus[:, i], nz(i), up=True)
        feats.append((f"convs.{2 * k}", out))
        out = _styled(sd, f"convs.{2 * k + 1}", out, wplus[:, i + 1], nz(i + 1))
        skip = _torgb(sd, f"to_rgbs.{k}", out, wplus[:, i + 2], skip)
        feats += [(f"convs.{2 * k + 1}", out), (f"to_rgbs.{k}", skip)]
    return feats

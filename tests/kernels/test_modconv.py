"""The reference op (kernels/modconv.py): the rewrites it relies on, impl validation, auto's log."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from kernels import modconv  # noqa: E402
from kernels.modconv import (  # noqa: E402
    demodulation,
    modulated_conv2d,
    modulated_conv2d_reference,
    transposed_to_conv_weight,
)


def _grouped(x, weight, style, dilation, padding):
    """StyleGAN2's formulation: per-sample demodulated weights, grouped conv (groups = B)."""
    b, cin, h, w = x.shape
    wb = weight[None] * style[:, None, :, None, None]
    wb = wb * torch.rsqrt(wb.square().sum(dim=(2, 3, 4)) + modconv.DEMOD_EPS)[:, :, None, None, None]
    y = F.conv2d(x.reshape(1, b * cin, h, w), wb.reshape(-1, cin, *weight.shape[2:]),
                 padding=padding, dilation=dilation, groups=b)
    return y.reshape(b, weight.shape[0], *y.shape[2:])


@pytest.mark.parametrize("dilation", [1, 2, 4, 8])
def test_reference_equals_grouped_formulation(dilation):
    g = torch.Generator().manual_seed(dilation)
    x = torch.randn(3, 6, 11, 9, generator=g, dtype=torch.float64)
    w = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64)
    s = torch.randn(3, 6, generator=g, dtype=torch.float64)
    y = modulated_conv2d_reference(x, w, s, dilation=dilation, activate=False)
    torch.testing.assert_close(y, _grouped(x, w, s, dilation, dilation), rtol=1e-10, atol=1e-10)


def test_demodulation_factorisation():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64)
    s = torch.randn(2, 5, generator=g, dtype=torch.float64)
    direct = torch.rsqrt((w[None] * s[:, None, :, None, None]).square().sum(dim=(2, 3, 4)) + 1e-8)
    torch.testing.assert_close(demodulation(w, s), direct, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dilation,padding", [(1, 1), (2, 2), (4, 0), (8, 8)])
def test_transposed_conv_at_stride_1_is_a_conv(dilation, padding):
    g = torch.Generator().manual_seed(dilation)
    x = torch.randn(2, 4, 20, 17, generator=g, dtype=torch.float64)
    wt = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64)  # [Cin, Cout, k, k]
    ref = F.conv_transpose2d(x, wt, padding=padding, dilation=dilation)
    y = F.conv2d(x, transposed_to_conv_weight(wt), dilation=dilation,
                 padding=dilation * (3 - 1) - padding)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_impl_validation_and_auto_logging(caplog):
    x, w, st = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(1, 3)
    with pytest.raises(ValueError, match="impl must be one of"):
        modulated_conv2d(x, w, st, impl="cuda")
    with pytest.raises(ValueError, match="Cin mismatch"):
        modulated_conv2d(x, w[:, :2], st, impl="plugin")
    with pytest.raises(ValueError, match="batch mismatch"):
        modulated_conv2d(x, w, torch.randn(2, 3), impl="plugin")
    modconv._auto_logged.clear()
    with caplog.at_level(logging.INFO, logger="kernels.modconv"):
        y = modulated_conv2d(x, w, st, impl="auto")
    assert "impl=auto chose 'reference' for cpu" in caplog.text
    torch.testing.assert_close(y, modulated_conv2d_reference(x, w, st), rtol=0, atol=0)

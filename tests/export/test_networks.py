"""export.networks against independent formulations (tests/export/_official.py) and the official
formulation (forward_official), at the tiny width (width_div=4), tiny shapes.

Tolerances: float32 on CPU. Different but exact rewrites of the same sums (grouped vs shared-
weight conv, transposed vs flipped conv, blur order, batch vs single) differ by rounding only:
PARITY_ATOL 1e-4 on whole-model outputs of magnitude ~1-8 (measured 2e-6..5e-5), OP_ATOL 1e-5 on
single ops of magnitude ~1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from export.checkpoint import _random_state_dict, build_model, load_or_random
from export.networks import Generator, ModelConfig, ModulatedConv2d, StyleGANEX, ToRGB, upfirdn2d_native
from runtime.tasks import noise_shapes
from _official import blur_kernel_x4, stylegan2_plain, upfirdn2d_def

TINY_WIDTH_DIV = 4  # conftest.TINY_WIDTH_DIV: the width of the tiny_ckpt fixture's checkpoints
PARITY_ATOL = 1e-4
OP_ATOL = 1e-5
D = 512 // TINY_WIDTH_DIV

TASK_VARIANTS = [("superres", "sr"), ("superres", "sr32"), ("edit", None), ("toonify", None),
                 ("inversion", None), ("sketch2face", None), ("mask2face", None)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_for():
    """Tiny random models, in memory (checkpoint files are exercised by test_checkpoint.py)."""
    cache = {}

    def get(task, variant=None):
        if (task, variant) not in cache:
            ck = load_or_random(task, None, True, seed=0, width_div=TINY_WIDTH_DIV, variant=variant)
            cache[(task, variant)] = build_model(ck, task)
        return cache[(task, variant)]

    return get


def _noises(b, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 1, *s, generator=g) for s in noise_shapes(h, w)]


def _inputs(model, b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    if model.cfg.label_nc == 1:
        x = torch.rand(b, 1, h, w, generator=g)
    elif model.cfg.label_nc == 19:
        x = F.one_hot(torch.randint(0, 19, (b, h, w), generator=g), 19).permute(0, 3, 1, 2).float()
    else:
        x = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    return x, torch.rand(b, 3, 32, 32, generator=g) * 2 - 1, torch.randn(b, D, generator=g)


def _run(model, x, x2, z, noises, editing_w=None):
    """(reference output, official output) for the model's task graph."""
    with torch.no_grad():
        if model.cfg.label_nc:
            return model.translate(x, z, noises), model.forward_official(x, z=z, noises=noises)
        return (model.synth(x, model.style(x2), editing_w, noises),
                model.forward_official(x, x2, editing_w=editing_w, noises=noises))


# ---------------------------------------------------------------------------------------------
# Single ops


@pytest.mark.parametrize("h,w", [(5, 7), (8, 3)])
def test_torgb_upsample_equals_upfirdn2d(h, w):
    x = torch.randn(2, 3, h, w)
    rgb = ToRGB(8, 16, skip="up")
    ref = upfirdn2d_def(x, blur_kernel_x4(), up=2, pad=(2, 1))
    assert ref.shape == (2, 3, 2 * h, 2 * w)
    torch.testing.assert_close(rgb.upsample_skip(x, "reference"), ref, atol=OP_ATOL, rtol=0)
    torch.testing.assert_close(rgb.upsample_skip(x, "official"), ref, atol=OP_ATOL, rtol=0)
    torch.testing.assert_close(upfirdn2d_native(x, blur_kernel_x4(), up=1, pad=(1, 1)),
                               upfirdn2d_def(x, blur_kernel_x4(), up=1, pad=(1, 1)), atol=OP_ATOL, rtol=0)


@pytest.mark.parametrize("kind,dilation", [("dilated_up", 8), ("dilated_up", 4), ("dilated_up", 2),
                                           ("up2", 1), ("plain", 4), ("plain", 1)])
@pytest.mark.parametrize("h,w", [(5, 9), (6, 4)])
def test_modconv_rewrites_equal_official(kind, dilation, h, w):
    """Shared-weight formulations (dilated transposed conv as blur + flipped dilated conv; input
    modulation for the stride-2 up-conv) == per-sample grouped conv_transpose2d/conv2d."""
    torch.manual_seed(0)
    conv = ModulatedConv2d(6, 5, 3, 16, upsample=kind != "plain", dilation=dilation)
    assert conv.kind == kind
    with torch.no_grad():
        conv.weight.normal_()
        conv.modulation.weight.normal_()
        conv.modulation.bias.fill_(1.0)
    x, lat = torch.randn(3, 6, h, w), torch.randn(3, 16)
    bias = torch.randn(5)
    ho, wo = (2 * h, 2 * w) if kind == "up2" else (h, w)
    noise = torch.randn(3, 1, ho, wo)
    with torch.no_grad():
        for kw in (dict(), dict(noise=noise, noise_strength=torch.tensor([0.3]), bias=bias, activate=True)):
            ref = conv.run(x, lat, "reference", **kw)
            assert ref.shape == (3, 5, ho, wo)
            torch.testing.assert_close(ref, conv.run(x, lat, "official", **kw), atol=OP_ATOL, rtol=0)


def test_impl_names():
    m = StyleGANEX(ModelConfig(width_div=TINY_WIDTH_DIV))
    assert m.modconv_impl == "reference"
    assert m.set_modconv_impl("official") is m and m.modconv_impl == "official"
    with pytest.raises(ValueError, match="impl"):
        m.set_modconv_impl("cuda")


# ---------------------------------------------------------------------------------------------
# Spec 1.10: the StyleGAN compatibility identity


@pytest.mark.parametrize("width_div", [TINY_WIDTH_DIV, pytest.param(1, marks=pytest.mark.slow)])
def test_constant_path_reproduces_plain_stylegan2(model_for, width_div):
    """Fed the 4x4 constant upsampled x8 (nearest), every StyleGANEX layer equals the
    nearest-upsampled layer of plain StyleGAN2 with the same weights, noise included (the
    plain net's nominal-size noise, nearest-upsampled for StyleGANEX). Tiny width by default,
    the official width (as in spec 1.10) under -m slow."""
    if width_div == TINY_WIDTH_DIV:
        model = model_for("inversion")
        decoder, sd, latent_avg = model.decoder, model.state_dict(), model.latent_avg
    else:
        cfg = ModelConfig(width_div=width_div)
        full = _random_state_dict(cfg, torch.Generator().manual_seed(0))
        sd = {k: v for k, v in full.items() if k.startswith("decoder.")}
        decoder = Generator(cfg)
        decoder.load_state_dict({k[len("decoder."):]: sd[k] for k in
                                 ("decoder." + n for n in decoder.state_dict())}, strict=True)
        decoder.eval()
        latent_avg = torch.zeros(18, cfg.style_dim)
    dim = latent_avg.shape[-1]
    g = torch.Generator().manual_seed(5)
    wplus = latent_avg + 0.5 * torch.randn(1, 18, dim, generator=g)
    nominal = [2 ** ((j + 5) // 2) for j in range(17)]
    plain_noise = [torch.randn(1, 1, r, r, generator=g) for r in nominal]
    ex_noise = [F.interpolate(n, size=s, mode="nearest") for n, s in zip(plain_noise, noise_shapes(256, 256))]
    with torch.no_grad():
        ours = []
        out = decoder(wplus, None, noises=ex_noise, collect=ours)
        ref = stylegan2_plain(sd, wplus, plain_noise)
    assert out.shape == (1, 3, 1024, 1024)
    assert [n for n, _ in ours] == [n for n, _ in ref] and len(ours) == 26
    for (name, a), (_, b) in zip(ours, ref):
        up = F.interpolate(b, size=a.shape[-2:], mode="nearest")
        tol = 1e-5 * max(1.0, b.abs().max().item())
        err = (a - up).abs().max().item()
        assert err <= tol, f"{name}: max |diff| {err:.3g} > {tol:.3g}"


# ---------------------------------------------------------------------------------------------
# Reference (shared-weight, export) formulation vs the official formulation, per task config


@pytest.mark.parametrize("task,variant", TASK_VARIANTS)
def test_graph_matches_forward_official(model_for, task, variant):
    model = model_for(task, variant)
    # batch 2 (the official convs group by sample) where it matters most; one non-square size
    b, h, w = (2, 32, 32) if task in ("edit", "sketch2face") else (1, 32, 64) if variant == "sr" else (1, 32, 32)
    x, x2, z = _inputs(model, b, h, w)
    noises = _noises(b, h, w)
    ew = None
    if task == "edit":
        ew = (model.editing_w[0:1] * torch.tensor([1.0, -2.0])[:, None, None])  # per-sample scales
    ref, off = _run(model, x, x2, z, noises, ew)
    assert ref.shape == (b, 3, 4 * h, 4 * w)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ref, off, atol=PARITY_ATOL, rtol=0)


def test_skip_torgb_and_deep_attention_config():
    """A configuration no official task uses (fusion_skip, use_att=2) still matches."""
    cfg = ModelConfig(n_fusion=7, use_att=2, skip_torgb=True, width_div=TINY_WIDTH_DIV)
    model = StyleGANEX(cfg)
    sd = _random_state_dict(cfg, torch.Generator().manual_seed(0))
    model.load_state_dict({k: sd[k] for k in model.state_dict()}, strict=True)
    model.eval()
    x, x2, _ = _inputs(model, 1, 32, 32)
    ew = 0.3 * torch.randn(1, 18, D)
    ref, off = _run(model, x, x2, None, _noises(1, 32, 32), ew)
    torch.testing.assert_close(ref, off, atol=PARITY_ATOL, rtol=0)


def test_editing_w_conditions_attention(model_for):
    """edit: editing_w is added to w+ AND conditions the fusion attention (rows 2k+1)."""
    model = model_for("edit")
    x, x2, _ = _inputs(model, 1, 32, 32)
    ew = model.editing_w[0:1]
    with torch.no_grad():
        wplus = model.style(x2)
        with_att = model.synth(x, wplus, ew)
        added_only = model.synth(x, wplus + ew)
    assert (with_att - added_only).abs().max() > 1e-3


def test_translate_code_rows(model_for):
    """translate: w+ rows 0..7 = E(x) + latent_avg (per-sample BN), rows 8..17 = 0.7 * mapping(z);
    mapping = PixelNorm + 8 x (EqualLinear lr_mul 0.01, leaky ReLU 0.2 x sqrt 2)."""
    model = model_for("mask2face")
    x, _, z = _inputs(model, 2, 32, 32)
    noises = _noises(2, 32, 32)
    sd = model.state_dict()
    w = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)
    for i in range(1, 9):
        lin = w @ (sd[f"decoder.style.{i}.weight"] * 0.01 / D ** 0.5).t() + sd[f"decoder.style.{i}.bias"] * 0.01
        w = F.leaky_relu(lin, 0.2) * 2 ** 0.5
    with torch.no_grad():
        torch.testing.assert_close(model.mapping(z), w, atol=OP_ATOL, rtol=1e-5)
        t = model.encoder.taps(x, "sample")
        codes = model.encoder.codes(t) + model.latent_avg
        wplus = torch.cat([codes[:, :8], (0.7 * w)[:, None].expand(-1, 10, -1)], 1)
        want = model.decoder(wplus, model.encoder.first_feature(t), model.encoder.fusion_feats(t),
                             model.encoder.fusion, None, noises)
        torch.testing.assert_close(model.translate(x, z, noises), want, atol=OP_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Sizes, batching, determinism, noise


@pytest.mark.parametrize("h,w", [(32, 64), (40, 56), (96, 32)])
def test_output_size_rule(model_for, h, w):
    """Spec 5: f = H/8 x W/8, output = 4H x 4W, noise at the real feature sizes."""
    model = model_for("superres", "sr32")
    x, x2, _ = _inputs(model, 1, h, w)
    with torch.no_grad():
        t = model.encoder.taps(x, "running", last_unit=20)
        assert model.encoder.first_feature(t).shape == (1, D, h // 8, w // 8)
        y = model.synth(x, model.latent_avg[None], None, _noises(1, h, w))
    assert y.shape == (1, 3, 4 * h, 4 * w)


def test_translate_output_size(model_for):
    model = model_for("sketch2face")
    x, _, z = _inputs(model, 1, 40, 56)
    with torch.no_grad():
        assert model.translate(x, z, _noises(1, 40, 56)).shape == (1, 3, 160, 224)


@pytest.mark.parametrize("task", ["edit", "sketch2face"])
def test_batch_equals_single_runs(model_for, task):
    """Batching never changes a result (translate: per-sample normalization statistics)."""
    model = model_for(task)
    b, h, w = 2, 32, 32
    x, x2, z = _inputs(model, b, h, w)
    noises = _noises(b, h, w)
    with torch.no_grad():
        if task == "edit":
            ew = model.editing_w[0:1].expand(b, -1, -1) * torch.tensor([1.0, 0.5])[:, None, None]
            wplus = model.style(x2)
            both = model.synth(x, wplus, ew, noises)
            single = [model.synth(x[i:i + 1], model.style(x2[i:i + 1]), ew[i:i + 1], [n[i:i + 1] for n in noises])
                      for i in range(b)]
        else:
            both = model.translate(x, z, noises)
            single = [model.translate(x[i:i + 1], z[i:i + 1], [n[i:i + 1] for n in noises]) for i in range(b)]
    torch.testing.assert_close(both, torch.cat(single), atol=PARITY_ATOL, rtol=0)


def test_translate_uses_per_sample_statistics(model_for):
    """Changing the stored BN statistics does not change translate (per-sample stats), but does
    change the RGB path (eval BN)."""
    model = model_for("sketch2face")
    x, _, z = _inputs(model, 1, 32, 32)
    bn = model.encoder.input_label_layer.model[11]
    with torch.no_grad():
        before = model.translate(x, z)
        x2 = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        before_style = model.style(x2)
        saved = bn.running_mean.clone(), model.encoder.body[0].res_layer[0].running_var.clone()
        bn.running_mean.add_(1.0)
        model.encoder.body[0].res_layer[0].running_var.mul_(4.0)
        try:
            after = model.translate(x, z)
            after_style = model.style(x2)
        finally:
            bn.running_mean.copy_(saved[0])
            model.encoder.body[0].res_layer[0].running_var.copy_(saved[1])
    torch.testing.assert_close(before, after, atol=0, rtol=0)
    assert (before_style - after_style).abs().max() > 1e-4


def test_zero_noise_is_no_noise(model_for):
    model = model_for("inversion")
    x, x2, _ = _inputs(model, 1, 32, 32)
    with torch.no_grad():
        wplus = model.style(x2)
        none = model.synth(x, wplus, None, None)
        zeros = model.synth(x, wplus, None, [torch.zeros(1, 1, *s) for s in noise_shapes(32, 32)])
        noisy = model.synth(x, wplus, None, _noises(1, 32, 32))
    torch.testing.assert_close(none, zeros, atol=0, rtol=0)
    assert (none - noisy).abs().max() > 1e-3


def test_synth_computes_no_style_heads(model_for):
    model = model_for("superres")
    calls = []
    hooks = [h.register_forward_hook(lambda *a: calls.append(1)) for h in model.encoder.styles]
    try:
        x, x2, _ = _inputs(model, 1, 32, 32)
        with torch.no_grad():
            wplus = model.style(x2)
            assert len(calls) == 18
            model.synth(x, wplus)
            assert len(calls) == 18
            model.forward_official(x, x2)
            assert len(calls) == 18 + 36
    finally:
        for h in hooks:
            h.remove()


def test_no_batch_grouped_conv_or_adaptive_pool_in_reference_paths(model_for, monkeypatch):
    """The export paths (style/synth/translate) use no groups=batch conv and no adaptive pooling."""
    model = model_for("edit")
    x, x2, _ = _inputs(model, 3, 32, 32)
    seen = []
    real_conv, real_convt = F.conv2d, F.conv_transpose2d

    def conv(inp, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if groups > 1:
            seen.append((groups, inp.shape[1], weight.shape[1]))
        return real_conv(inp, weight, bias, stride, padding, dilation, groups)

    def convt(inp, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
        if groups > 1:
            seen.append((groups, inp.shape[1], weight.shape[0] // groups))
        return real_convt(inp, weight, bias, stride, padding, output_padding, groups, dilation)

    def no_adaptive(*a, **kw):
        raise AssertionError("adaptive pooling in an export path")

    monkeypatch.setattr(F, "conv2d", conv)
    monkeypatch.setattr(F, "conv_transpose2d", convt)
    monkeypatch.setattr(F, "adaptive_avg_pool2d", no_adaptive)
    with torch.no_grad():
        model.synth(x, model.style(x2), model.editing_w[0:1].expand(3, -1, -1), _noises(3, 32, 32))
    # every grouped conv is depthwise over channels (groups == input channels, 1 channel/group)
    assert seen and all(g == c and per == 1 for g, c, per in seen), seen


@pytest.mark.slow
@pytest.mark.parametrize("task", ["edit", "sketch2face"])
def test_graphs_export_with_dynamic_batch_height_width(model_for, task):
    """torch.export with dynamic batch/height/width (what the ONNX exporter traces), then the
    exported program at another batch and size (one side 32: the style heads' maps reach 1x1)
    equals eager. backed_size_oblivious: without it the tracer guards on which intermediate head
    maps are 1 pixel wide (contiguity checks) and narrows the translate graph to the example's
    size range."""
    import torch.fx.experimental._config as fx_config

    model = model_for(task)
    b = torch.export.Dim("batch", min=1, max=8)
    h, w = torch.export.Dim("h", min=1, max=16), torch.export.Dim("w", min=1, max=16)  # x1 side = 32 * h
    up = [2 ** max(0, (j - 5) // 2) for j in range(17)]  # as runtime.tasks.noise_shapes
    nz_dims = tuple({0: b, 2: 4 * h * u, 3: 4 * w * u} for u in up)

    class Graph(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, code, *noises):
            if task == "edit":
                return self.m.synth(x, code, self.m.editing_w[0:1].expand(x.shape[0], -1, -1), list(noises))
            return self.m.translate(x, code, list(noises))

    x, x2, z = _inputs(model, 2, 64, 96)  # sizes > 1 in every dim: 0/1 would be specialized
    code = model.style(x2) if task == "edit" else z
    with fx_config.patch(backed_size_oblivious=True):
        ep = torch.export.export(Graph(model), (x, code, *_noises(2, 64, 96)),
                                 dynamic_shapes=({0: b, 2: 32 * h, 3: 32 * w}, {0: b}, nz_dims))
    x, x2, z = _inputs(model, 3, 96, 32, seed=4)
    code = model.style(x2) if task == "edit" else z
    args = (x, code, *_noises(3, 96, 32, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*args), Graph(model)(*args), atol=PARITY_ATOL, rtol=0)

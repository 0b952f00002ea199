"""export.checkpoint: key sets against the official list, strict loading, config inference,
random official-format checkpoints, and one-line errors for bad files.

data/checkpoint_keys.txt is a copy of spec/checkpoint_keys.txt (keys and shapes read off the
official pSp module at width 1).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest
import torch

from export.checkpoint import (
    RANDOM_NOTICE,
    build_model,
    constant_buffer_shapes,
    expected_shapes,
    infer_config,
    load_checkpoint,
    load_or_random,
    random_checkpoint,
)
from export.networks import ModelConfig
from runtime.errors import SgexError
from runtime.tasks import TASKS, noise_shapes

KEYS_FILE = Path(__file__).parent / "data" / "checkpoint_keys.txt"
TINY = 4  # conftest.TINY_WIDTH_DIV
CONFIGS = [(t.name, v.name) for t in TASKS.values() for v in t.variants]


pytestmark = pytest.mark.usefixtures("one_thread")


def _spec_sections() -> dict[str, dict[str, tuple]]:
    sections: dict[str, dict[str, tuple]] = {}
    cur = None
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("# SECTION"):
            cur = line.split()[2].rstrip(":")
            sections[cur] = {}
        elif line.strip() and not line.startswith("#"):
            name, shape, _dtype = line.split()
            sections[cur][name] = tuple(int(x) for x in shape[1:-1].split(",") if x)
    return sections


SPEC = _spec_sections()


def _spec_keys(cfg: ModelConfig) -> dict[str, tuple]:
    """The official state_dict of a config, assembled from sections A, B, C/C2 (width 1)."""
    keys = dict(SPEC["A"])
    for name, shape in SPEC["B"].items():
        k, sub = re.match(r"encoder\.fusion\.(\d+)\.(\w+)", name).groups()
        if int(k) >= cfg.n_fusion:
            continue
        if sub == "fusion_skip" and not cfg.skip_torgb:
            continue
        if sub in ("linear", "norm", "conv") and not cfg.use_att:
            continue
        keys[name] = shape
    if cfg.label_nc:
        keys.update(SPEC["C"])
        if cfg.label_nc == 19:
            keys.update(SPEC["C2"])
    return keys


def _cfg(task, variant, width_div=1, skip_torgb=False):
    t, v = TASKS[task], TASKS[task].variant(variant)
    return ModelConfig(n_fusion=v.n_fusion, use_att=v.use_att, skip_torgb=skip_torgb,
                       label_nc=0 if t.in_channels == 3 else t.in_channels, width_div=width_div)


def test_spec_file_sections():
    assert len(SPEC["A"]) == 802 and len(SPEC["B"]) == 7 * 14 and len(SPEC["C"]) == 23 and len(SPEC["C2"]) == 2


@pytest.mark.parametrize("task,variant", CONFIGS)
def test_task_key_set_equals_official(task, variant):
    """Model keys + rebuilt constant buffers == the official state_dict (names and shapes, width 1,
    built on the meta device); the official key set loads strictly and infers this task."""
    cfg = _cfg(task, variant)
    official = _spec_keys(cfg)
    ours = {**expected_shapes(cfg), **constant_buffer_shapes(cfg)}
    assert sorted(set(official) - set(ours)) == [] and sorted(set(ours) - set(official)) == []
    assert {k: official[k] for k in ours} == ours
    got_cfg, got_task, got_variant = infer_config(official)
    assert (got_cfg, got_task) == (cfg, task)
    v_got, v_want = TASKS[task].variant(got_variant), TASKS[task].variant(variant)
    assert (v_got.n_fusion, v_got.use_att) == (v_want.n_fusion, v_want.use_att)  # hair/age etc. share a layout


def test_skip_torgb_key_set_equals_official():
    cfg = ModelConfig(n_fusion=7, use_att=1, skip_torgb=True)
    ours = {**expected_shapes(cfg), **constant_buffer_shapes(cfg)}
    assert ours == _spec_keys(cfg)
    assert infer_config(ours)[0] == cfg


def test_unknown_configuration_is_refused():
    cfg = ModelConfig(n_fusion=3)
    with pytest.raises(SgexError, match="matches no known task"):
        infer_config(expected_shapes(cfg))


@pytest.mark.parametrize("task", ["superres", "sketch2face", "edit"])
def test_tiny_random_checkpoint_format(tiny_ckpt, task):
    """Files from random_checkpoint carry every official key (tiny shapes), the official opts
    fields, latent_avg [18,D], editing_w [N,18,D] for edit; loading rebuilds them exactly."""
    path = tiny_ckpt(task)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    cfg = _cfg(task, None, TINY)
    assert set(raw["state_dict"]) == set(_spec_keys(_cfg(task, None)))
    for f in ("output_size", "encoder_type", "input_nc", "res_num", "use_skip", "skip_max_layer",
              "use_skip_torgb", "use_att", "max_pooling", "start_from_latent_avg", "learn_in_w",
              "dataset_type", "toonify_weights"):
        assert f in raw["opts"], f
    assert raw["latent_avg"].shape == (18, cfg.style_dim)
    assert ("editing_w" in raw) == (task == "edit")
    ck = load_checkpoint(path)
    assert (ck.config, ck.task, ck.random, ck.seed) == (cfg, task, True, 0)
    assert len(ck.sha256) == 64
    model = build_model(ck, task)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], raw["state_dict"][k]) for k in sd)
    torch.testing.assert_close(model.latent_avg, raw["latent_avg"], atol=0, rtol=0)
    if task == "edit":
        assert model.editing_w.shape == raw["editing_w"].shape


def test_same_seed_same_checkpoint():
    a = random_checkpoint("inversion", seed=7, width_div=TINY)
    b = random_checkpoint("inversion", seed=7, width_div=TINY)
    c = random_checkpoint("inversion", seed=8, width_div=TINY)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert torch.equal(a["latent_avg"], b["latent_avg"])
    assert not torch.equal(a["state_dict"]["decoder.conv1.conv.weight"], c["state_dict"]["decoder.conv1.conv.weight"])


def test_constant_buffers_are_optional(tiny_ckpt, tmp_path):
    """A file without blur kernels / noise buffers / num_batches_tracked loads to the same model."""
    raw = torch.load(tiny_ckpt("superres"), map_location="cpu", weights_only=True)
    consts = constant_buffer_shapes(_cfg("superres", None, TINY))
    raw["state_dict"] = {k: v for k, v in raw["state_dict"].items() if k not in consts}
    p = tmp_path / "no_buffers.pt"
    torch.save(raw, p)
    full = build_model(load_checkpoint(tiny_ckpt("superres")))
    lean = build_model(load_checkpoint(p))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    nz = [torch.randn(1, 1, *s) for s in noise_shapes(32, 32)]
    with torch.no_grad():
        torch.testing.assert_close(full.synth(x, full.style(x), None, nz), lean.synth(x, lean.style(x), None, nz),
                                   atol=0, rtol=0)


def _official_constant(key: str) -> torch.Tensor:
    """The constants as the official modules build them (spec 1.4, 1.5, 6), written here from the
    spec: blur_weight = [1,2,1] x [1,2,1] / 16; Blur/Upsample kernels = [1,3,3,1] x [1,3,3,1] / 64
    times factor^2 = 4 (every stored kernel belongs to an upsampling layer)."""
    if key.endswith("blur_weight"):
        k = torch.tensor([1.0, 2.0, 1.0])
        return torch.outer(k, k).div(16).view(1, 1, 3, 3)
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    return torch.outer(k, k).div(64).mul(4)


def test_random_checkpoint_holds_the_official_constants(tiny_ckpt):
    sd = torch.load(tiny_ckpt("superres"), map_location="cpu", weights_only=True)["state_dict"]
    keys = [k for k in sd if k.endswith(("blur_weight", ".blur.kernel", ".upsample.kernel"))]
    assert len(keys) == 6 + 16  # 3 dilated up-convs + 3 dilated ToRGBs; 8 up-convs + 8 ToRGB upsamples
    for k in keys:
        torch.testing.assert_close(sd[k], _official_constant(k), atol=0, rtol=0)


@pytest.mark.parametrize("key, change", [
    ("decoder.convs.2.conv.blur_weight", lambda t: t.index_put_((torch.tensor(0), torch.tensor(0), torch.tensor(1),
                                                                 torch.tensor(1)), torch.tensor(0.3))),
    ("decoder.to_rgbs.5.upsample.kernel", lambda t: t.div_(4)),  # gain 1 instead of factor^2
])
def test_changed_blur_buffer_is_refused(tiny_ckpt, tmp_path, key, change):
    raw = torch.load(tiny_ckpt("superres"), map_location="cpu", weights_only=True)
    want = _official_constant(key)
    change(raw["state_dict"][key])
    diff = float((raw["state_dict"][key] - want).abs().max())
    p = tmp_path / "modified.pt"
    torch.save(raw, p)
    msg = _one_line_error(lambda: load_checkpoint(p), f"constant buffer {key} differs")
    assert f"max |diff| {diff:.3g}" in msg


def test_latent_avg_and_editing_w_layouts(tiny_ckpt, tmp_path):
    raw = torch.load(tiny_ckpt("edit"), map_location="cpu", weights_only=True)
    d = raw["latent_avg"].shape[-1]
    raw["latent_avg"] = raw["latent_avg"][0].clone()  # (D,) as in a plain-mean checkpoint
    raw["editing_w"] = torch.randn(3, 18, d)
    p = tmp_path / "styleganex_edit_age.pt"
    torch.save(raw, p)
    ck = load_checkpoint(p)
    assert ck.latent_avg.shape == (18, d) and torch.equal(ck.latent_avg[5], raw["latent_avg"])
    assert ck.editing_w.shape == (3, 18, d)
    assert ck.variant == "age"  # official file name picks the variant
    raw["latent_avg"] = torch.zeros(17, d)
    torch.save(raw, p)
    with pytest.raises(SgexError, match="latent_avg"):
        load_checkpoint(p)


# ---------------------------------------------------------------------------------------------
# Errors: one line each


def _one_line_error(fn, match):
    with pytest.raises(SgexError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_wrong_task_is_refused(tiny_ckpt):
    path = tiny_ckpt("sketch2face")
    _one_line_error(lambda: load_or_random("superres", path, False), "sketch2face checkpoint .*not superres")
    _one_line_error(lambda: build_model(load_checkpoint(path), "edit"), "not edit")


def test_truncated_file(tiny_ckpt, tmp_path):
    data = Path(tiny_ckpt("superres")).read_bytes()
    p = tmp_path / "cut.pt"
    p.write_bytes(data[: len(data) // 2])
    _one_line_error(lambda: load_checkpoint(p), "truncated or corrupt")


@pytest.mark.parametrize("content,what", [(b"\x89PNG\r\n\x1a\n" + bytes(64), "PNG image"),
                                          (b"hello, not a checkpoint\n", "text file"), (b"", "empty file")])
def test_not_a_checkpoint(tmp_path, content, what):
    p = tmp_path / "x.pt"
    p.write_bytes(content)
    _one_line_error(lambda: load_checkpoint(p), f"not a PyTorch checkpoint \\({'an?'} {what}\\)")


def test_missing_file(tmp_path):
    _one_line_error(lambda: load_checkpoint(tmp_path / "nope.pt"), "not found")


def test_foreign_torch_files(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"model": torch.zeros(1)}, p)
    _one_line_error(lambda: load_checkpoint(p), "not a StyleGANEX checkpoint")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, p)
    _one_line_error(lambda: load_checkpoint(p), "not a StyleGANEX state_dict")
    torch.save({"state_dict": {}, "opts": argparse.Namespace(a=1)}, p)
    _one_line_error(lambda: load_checkpoint(p), "holds an object of type argparse.Namespace, which safe loading")


def test_missing_unexpected_and_misshaped_keys(tiny_ckpt, tmp_path):
    raw = torch.load(tiny_ckpt("superres"), map_location="cpu", weights_only=True)
    p = tmp_path / "bad.pt"
    sd = raw["state_dict"]

    bad = dict(sd)
    for k in ("decoder.convs.3.conv.weight", "encoder.body.4.res_layer.1.weight"):
        del bad[k]
    torch.save({**raw, "state_dict": bad}, p)
    msg = _one_line_error(lambda: load_checkpoint(p), "missing keys")
    assert "decoder.convs.3.conv.weight" in msg and "encoder.body.4.res_layer.1.weight" in msg

    torch.save({**raw, "state_dict": {**sd, **{f"encoder.extra{i}": torch.zeros(1) for i in range(9)}}}, p)
    msg = _one_line_error(lambda: load_checkpoint(p), "unexpected keys")
    assert "encoder.extra0" in msg and "(9 in all)" in msg

    torch.save({**raw, "state_dict": {**sd, "decoder.conv1.activate.bias": torch.zeros(7)}}, p)
    _one_line_error(lambda: load_checkpoint(p), "wrong shapes: decoder.conv1.activate.bias")

    torch.save({**raw, "opts": {**raw["opts"], "max_pooling": True}}, p)
    _one_line_error(lambda: load_checkpoint(p), "max_pooling")


def test_load_or_random_arguments_and_notice(caplog):
    _one_line_error(lambda: load_or_random("superres", None, False), "--ckpt")
    _one_line_error(lambda: load_or_random("superres", "x.pt", True), "not both")
    _one_line_error(lambda: load_or_random("nosuchtask", None, True), "unknown task")
    with caplog.at_level(logging.WARNING, logger="export.checkpoint"):
        ck = load_or_random("toonify", None, True, seed=3, width_div=TINY)
    assert RANDOM_NOTICE in caplog.text
    assert RANDOM_NOTICE == "random weights: outputs are noise, pass --ckpt for real results"
    assert (ck.task, ck.random, ck.seed, ck.path, ck.sha256) == ("toonify", True, 3, None, None)


@pytest.mark.slow
def test_full_size_round_trip(tmp_path):
    """A width-1 random checkpoint has exactly the official keys and shapes, loads strictly and
    runs (finite output)."""
    p = tmp_path / "styleganex_sr32.pt"
    random_checkpoint("superres", seed=1, variant="sr32", path=str(p))
    assert not list(tmp_path.glob(".*tmp*"))
    raw = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    cfg = _cfg("superres", "sr32")
    assert {k: tuple(v.shape) for k, v in raw["state_dict"].items()} == _spec_keys(cfg)
    ck = load_checkpoint(p)
    assert (ck.config, ck.task, ck.variant) == (cfg, "superres", "sr32")
    model = build_model(ck, "superres")
    with torch.no_grad():
        y = model.synth(torch.rand(1, 3, 32, 32) * 2 - 1, model.style(torch.rand(1, 3, 256, 256) * 2 - 1), None,
                        [torch.randn(1, 1, *s) for s in noise_shapes(32, 32)])
    assert y.shape == (1, 3, 128, 128) and torch.isfinite(y).all()

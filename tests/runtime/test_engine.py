"""runtime.Engine: routing, padding/cropping, chunking, validation and the seeded-noise rule on a
recording fake backend (no torch, fast); then the torch backend on tiny random checkpoints
(batch == singles, same seed same output) and ONNX Runtime artifacts of a tiny export against
the torch backend on the same inputs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from runtime import io as rio
from runtime.backends.base import Backend
from runtime.buckets import Bucket
from runtime.engine import Engine, _default_inputs, make_random_inputs
from runtime.errors import SgexError
from runtime.tasks import N_NOISE, get_task, noise_shapes

D = 8  # style dim of the fake engine


def assert_close_scaled(a, b, tol):
    """|a - b| <= tol * max(1, max|b|). The tiny random checkpoints use He init throughout the
    IR-SE-50 encoder, so w+ reaches ~1e3 (real checkpoints: O(1)); float32 reassociation between
    two conv implementations (or torch at batch 2 vs batch 1) then differs by ~5e-5 of the peak."""
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() <= tol * scale, (np.abs(a - b).max(), scale)


def realistic(w):
    """w+ rescaled to the O(1) magnitude of real checkpoints (peak 2), so synth comparisons use the
    absolute 1e-4 tolerance that holds for real weights."""
    return (w * (2.0 / np.abs(w).max())).astype(np.float32)


def assert_uint8_close(a, b):
    """uint8 images from float outputs that agree to ~1e-5: equal except where a value sits on a
    truncation boundary (off by one, in well under 0.1% of the entries)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


class FakeBackend(Backend):
    """style: wplus = mean of x2 in every entry; synth/translate: y = nearest 4x upsample of the
    first 3 input channels (+ wplus mean), so cropping/padding mistakes show in the pixels."""

    name = "fake"

    def __init__(self):
        self.calls = []

    def run(self, key, feeds):
        self.calls.append((key, {k: v.shape for k, v in feeds.items()}))
        if key == "style":
            x2 = feeds["x2"]
            return {"wplus": np.broadcast_to(x2.mean(axis=(1, 2, 3))[:, None, None], (x2.shape[0], 18, D)).copy()}
        x = feeds["x1"] if "x1" in feeds else np.repeat(feeds["x"][:, :1], 3, axis=1)
        y = np.repeat(np.repeat(x, 4, axis=2), 4, axis=3)
        if "wplus" in feeds:
            y = y + 0 * feeds["wplus"].mean(axis=(1, 2))[:, None, None, None]
        return {"y": y.astype(np.float32)}

    def describe(self):
        return "fake"


def fake_engine(task="superres", buckets=(Bucket(256, 2), Bucket(512, 4))):  # x1 up to 64 / 128
    spec = get_task(task)
    eng = Engine.__new__(Engine)
    ew = np.ones((1, 18, D), np.float32) if spec.editing else None
    eng._setup(spec, spec.default_variant.name, D, FakeBackend(), manifest=None,
               buckets=list(buckets) if buckets is not None else None,
               inputs=_default_inputs(spec), editing_w=ew, artifacts_dir=None)
    return eng


def test_pad_only_to_8_and_crop():
    eng = fake_engine()
    img = np.random.default_rng(0).integers(0, 256, (1, 40, 50, 3), dtype=np.uint8)
    y = eng.synthesize(img, np.zeros((1, 18, D), np.float32))
    assert y.shape == (1, 160, 200, 3) and y.dtype == np.uint8
    expect = rio.to_uint8(np.repeat(np.repeat(rio.rgb_to_model(img), 4, 2), 4, 3))
    np.testing.assert_array_equal(y, expect)
    key, shapes = eng.backend.calls[-1]
    assert key == "synth@256" and shapes["x1"] == (1, 3, 40, 56)  # 40 stays, 50 -> 56
    assert shapes["noise_16"] == (1, 1) + noise_shapes(40, 56)[16]


@pytest.mark.parametrize("task", ["superres", "edit", "sketch2face"])
@pytest.mark.parametrize("b,h,w", [(1, 72, 88), (2, 40, 56), (1, 8, 8)])
def test_multiples_of_8_reach_the_backend_at_their_size(task, b, h, w):
    """No padding for sides that are multiples of 8 (not of 16 or 32): the official crop sizes."""
    eng = fake_engine(task, buckets=(Bucket(256, 2), Bucket(384, 4)))
    if eng.bucket_graph == "synth":
        y = eng.synthesize_float(np.zeros((b, h, w, 3), np.uint8), np.zeros((1, 18, D), np.float32))
        name = "x1"
    else:
        y = eng.translate_float(np.zeros((b, h, w), np.uint8))
        name = "x"
    assert y.shape == (b, 3, 4 * h, 4 * w)
    key, shapes = eng.backend.calls[-1]
    assert shapes[name][2:] == (h, w) and key.endswith("@384" if max(h, w) > 64 else "@256")
    if "noise_0" in shapes:
        assert shapes["noise_0"][2:] == (h // 8, w // 8) and shapes["noise_16"][2:] == (4 * h, 4 * w)


def test_bucket_routing_and_chunking():
    eng = fake_engine()
    w = np.zeros((1, 18, D), np.float32)
    eng.synthesize(np.zeros((5, 70, 30, 3), np.uint8), w)  # 72x32 after padding -> bucket 512
    assert [(k, s["x1"][0]) for k, s in eng.backend.calls] == [("synth@512", 4), ("synth@512", 1)]
    eng.backend.calls.clear()
    eng.synthesize(np.zeros((3, 64, 33, 3), np.uint8), w)  # 64x40 fits bucket 256 (x1 <= 64, max batch 2)
    assert [(k, s["x1"]) for k, s in eng.backend.calls] == [("synth@256", (2, 3, 64, 40)), ("synth@256", (1, 3, 64, 40))]
    with pytest.raises(SgexError, match=r"x1 129x10 does not fit: the largest exported bucket 512 holds x1 up to "
                                        r"128x128; bucket 544 would hold it \(export it with --res 544\)"):
        eng.synthesize(np.zeros((1, 129, 10, 3), np.uint8), w)
    torch_like = fake_engine(buckets=None)  # torch: any size, one call
    torch_like.synthesize(np.zeros((5, 200, 40, 3), np.uint8), w)
    assert [k for k, _ in torch_like.backend.calls] == ["synth@800"]


def test_validation_names_the_dimension():
    eng = fake_engine()
    w = np.zeros((1, 18, D), np.float32)
    with pytest.raises(SgexError, match="dtype must be uint8"):
        eng.synthesize(np.zeros((1, 32, 32, 3), np.float32), w)
    with pytest.raises(SgexError, match=r"channels \(dimension 3"):
        eng.synthesize(np.zeros((1, 32, 32, 1), np.uint8), w)
    with pytest.raises(SgexError, match=r"wplus: batch \(dimension 0\) must be 1 or 2"):
        eng.synthesize(np.zeros((2, 32, 32, 3), np.uint8), np.zeros((3, 18, D), np.float32))
    with pytest.raises(SgexError, match=r"wplus: expected float32 \[B, 18, 8\]"):
        eng.synthesize(np.zeros((1, 32, 32, 3), np.uint8), np.zeros((1, 18, 4), np.float32))
    with pytest.raises(SgexError, match=r"height \(dimension 1"):
        eng.compute_style(np.zeros((1, 255, 256, 3), np.uint8))
    with pytest.raises(SgexError, match="needs 3 channels"):
        eng.process(np.zeros((32, 32), np.uint8))
    assert eng.backend.calls == []  # nothing reached the backend
    mask = fake_engine("mask2face")
    with pytest.raises(SgexError, match="0..18"):
        mask.translate(np.full((1, 8, 8), 30, np.uint8))
    with pytest.raises(SgexError, match="takes no x2"):
        mask.process(np.zeros((8, 8), np.uint8), x2=np.zeros((256, 256, 3), np.uint8))


def test_process_style_from_centre_square_and_edit_scale():
    eng = fake_engine("edit")
    img = np.zeros((40, 120, 3), np.uint8)
    img[:, 40:80] = 255
    out = eng.process(img, edit_scale=-2.0)
    assert out.shape == (160, 480, 3)
    (k0, s0), (k1, s1) = eng.backend.calls
    assert k0 == "style" and s0["x2"] == (1, 3, 256, 256)
    assert k1 == "synth@512" and s1["editing_w"] == (1, 18, D) and "noise_0" not in s1  # video recipe: zero noise


def test_random_inputs_rule():
    a = make_random_inputs(7, 2, 64, 96, noise=True, z_dim=5)
    assert a["z"].shape == (2, 5) and a["noise_0"].shape == (2, 1, 8, 12) and len(a) == 1 + N_NOISE
    np.testing.assert_array_equal(a["z"][0], a["z"][1])  # one int seed: every sample the same
    rng = np.random.default_rng(7)  # documented order: z first, then noise_0..noise_16
    np.testing.assert_array_equal(a["z"][0], rng.standard_normal(5).astype(np.float32))
    np.testing.assert_array_equal(a["noise_0"][0, 0], rng.standard_normal((8, 12)).astype(np.float32))
    b = make_random_inputs([7, 8], 2, 64, 96, noise=True)
    c = make_random_inputs(8, 1, 64, 96, noise=True)
    np.testing.assert_array_equal(b["noise_16"][1], c["noise_16"][0])
    assert not np.array_equal(b["noise_3"][0], b["noise_3"][1])
    with pytest.raises(SgexError, match="2 seeds for a batch of 3"):
        make_random_inputs([1, 2], 3, 32, 32, noise=True)


def test_process_video_style_once():
    eng = fake_engine("toonify")
    frames = [np.full((40, 40, 3), i * 20, np.uint8) for i in range(5)]
    outs = list(eng.process_video(iter(frames), batch_size=2))
    assert len(outs) == 5 and outs[0].shape == (160, 160, 3)
    keys = [k for k, _ in eng.backend.calls]
    assert keys == ["style", "synth@256", "synth@256", "synth@256"]
    with pytest.raises(SgexError, match="no frames"):
        list(eng.process_video(iter([])))


# -- torch backend on tiny random checkpoints -------------------------------------------------------

@pytest.fixture(scope="module")
def torch_engines(tiny_ckpt):
    pytest.importorskip("torch")
    cache = {}

    def get(task):
        if task not in cache:
            cache[task] = Engine.from_checkpoint(task, ckpt=tiny_ckpt(task), device="cpu")
        return cache[task]

    return get


OFFICIAL_CROP_SIZES = [(1, 72, 88), (2, 72, 88), (1, 40, 56), (2, 40, 56)]  # multiples of 8, not of 16 or 32


def reference_call(eng, x, wplus=None, *, seed=0, edit_scale=1.0):
    """The reference model (export.networks.StyleGANEX) called directly at the input's own size with
    the Engine's documented seeded inputs: float32 [B, 3, 4H, 4W]."""
    import torch

    model = eng.backend.model
    b, h, w = x.shape[:3]
    rand = make_random_inputs(seed, b, h, w, noise=eng._noise,
                              z_dim=eng.style_dim if eng.bucket_graph == "translate" else None)
    noises = [torch.from_numpy(rand[f"noise_{j}"]) for j in range(N_NOISE)] if eng._noise else None
    with torch.inference_mode():
        if eng.bucket_graph == "translate":
            t = rio.sketch_to_model(x) if eng.spec.input_kind == "sketch" else rio.mask_to_model(x)
            return model.translate(torch.from_numpy(t), torch.from_numpy(rand["z"]), noises=noises).numpy()
        ew = None
        if eng.editing_w is not None:
            ew = torch.from_numpy(np.repeat(eng.editing_w * np.float32(edit_scale), b, axis=0))
        return model.synth(torch.from_numpy(rio.rgb_to_model(x)), torch.from_numpy(wplus), editing_w=ew,
                           noises=noises).numpy()


def engine_inputs(eng, b, h, w, seed):
    rng = np.random.default_rng(seed)
    if eng.bucket_graph == "translate":
        top = 19 if eng.spec.input_kind == "mask" else 256
        return rng.integers(0, top, (b, h, w), dtype=np.uint8), None
    wplus = rng.standard_normal((b, 18, eng.style_dim)).astype(np.float32) * np.float32(0.5)
    return rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8), wplus


def engine_float(eng, x, wplus, seed, edit_scale=1.0):
    if eng.bucket_graph == "translate":
        return eng.translate_float(x, seed=seed)
    return eng.synthesize_float(x, wplus, seed=seed, edit_scale=edit_scale)


@pytest.mark.parametrize("task", ["superres", "edit", "toonify", "inversion", "sketch2face", "mask2face"])
def test_torch_engine_at_official_crop_sizes_equals_the_reference(torch_engines, task):
    """x1 at multiples of 8 that are not multiples of 16 or 32 reaches the model as it is: the
    Engine's output equals the reference model called directly at that size."""
    eng = torch_engines(task)
    for i, (b, h, w) in enumerate(OFFICIAL_CROP_SIZES):
        x, wplus = engine_inputs(eng, b, h, w, seed=i)
        y = engine_float(eng, x, wplus, seed=[i + 1, i + 2][:b], edit_scale=-1.5)
        ref = reference_call(eng, x, wplus, seed=[i + 1, i + 2][:b], edit_scale=-1.5)
        assert y.shape == ref.shape == (b, 3, 4 * h, 4 * w)
        assert_close_scaled(y, ref, 1e-4)


def test_torch_batch_equals_singles_and_seeds(torch_engines):
    eng = torch_engines("superres")
    rng = np.random.default_rng(1)
    x1 = rng.integers(0, 256, (2, 24, 20, 3), dtype=np.uint8)
    x2 = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    w_raw = eng.compute_style(x2)
    assert w_raw.shape == (2, 18, eng.style_dim)
    assert_close_scaled(eng.compute_style(x2[1]), w_raw[1:], 2e-4)
    w = realistic(w_raw)
    both = eng.synthesize_float(x1, w, seed=[3, 4])
    assert both.shape == (2, 3, 96, 80)
    for i, s in enumerate((3, 4)):
        one = eng.synthesize_float(x1[i:i + 1], w[i:i + 1], seed=s)
        np.testing.assert_allclose(both[i:i + 1], one, atol=1e-4)
    again = eng.synthesize_float(x1[:1], w[:1], seed=3)
    np.testing.assert_array_equal(again, eng.synthesize_float(x1[:1], w[:1], seed=3))  # same seed, same output
    assert np.abs(again - eng.synthesize_float(x1[:1], w[:1], seed=4)).max() > 1e-3  # the seed matters


def test_torch_translate_batch_and_seed(torch_engines):
    eng = torch_engines("sketch2face")
    x = np.random.default_rng(2).integers(0, 256, (2, 40, 33), dtype=np.uint8)  # padded to 64x64
    both = eng.translate_float(x, seed=5)
    assert both.shape == (2, 3, 160, 132)
    assert_close_scaled(eng.translate_float(x[1:], seed=5), both[1:], 1e-4)  # per-sample BN stats
    out = eng.process(x[0], seed=5)
    assert out.shape == (160, 132, 3) and out.dtype == np.uint8
    ref = rio.to_uint8(both[:1])[0]
    assert (out != ref).mean() < 1e-3  # batch 2 vs batch 1: float rounding at truncation boundaries only


def test_torch_edit_scale_reaches_the_model(torch_engines):
    import torch

    eng = torch_engines("edit")
    rng = np.random.default_rng(6)
    x1 = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    w = rng.standard_normal((1, 18, eng.style_dim)).astype(np.float32)
    y = eng.synthesize_float(x1, w, edit_scale=-2.0)
    with torch.inference_mode():
        ref = eng.backend.model.synth(torch.from_numpy(rio.rgb_to_model(x1)), torch.from_numpy(w),
                                      editing_w=torch.from_numpy(-2.0 * eng.editing_w)).numpy()
    np.testing.assert_array_equal(y, ref)
    assert np.abs(y - eng.synthesize_float(x1, w)).max() > 1e-3  # the default +1.0 is another edit


# -- ONNX Runtime artifacts vs the torch backend ------------------------------------------------

@pytest.fixture
def tiny_export(tiny_superres_export):
    return tiny_superres_export


def test_ort_equals_torch(tiny_export, torch_engines):
    ort_eng = Engine(tiny_export, backend="auto", task="superres")
    assert ort_eng.backend.name == "ort" and ort_eng.buckets == [Bucket(1024, 2)]
    ref = torch_engines("superres")
    rng = np.random.default_rng(3)
    x1 = rng.integers(0, 256, (3, 20, 27, 3), dtype=np.uint8)  # padded to 24x32; batch 3 > max batch 2: two chunks
    x2 = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    w_ort, w_ref = ort_eng.compute_style(x2), ref.compute_style(x2)
    assert_close_scaled(w_ort, w_ref, 2e-4)
    w_ref = realistic(w_ref)
    y_ort = ort_eng.synthesize_float(x1, w_ref, seed=[1, 2, 3])
    y_ref = ref.synthesize_float(x1, w_ref, seed=[1, 2, 3])
    assert y_ort.shape == (3, 3, 80, 108)
    np.testing.assert_allclose(y_ort, y_ref, atol=1e-4)
    assert_uint8_close(rio.to_uint8(y_ort), rio.to_uint8(y_ref))
    with pytest.raises(SgexError, match=r"bucket 1056 would hold it \(export it with --res 1056\)"):
        ort_eng.synthesize(np.zeros((1, 264, 264, 3), np.uint8), w_ref[:1])


def test_ort_engine_at_official_crop_sizes_equals_the_reference(tiny_export, torch_engines):
    """One exported bucket graph (1024) at x1 sizes that are multiples of 8 but not of 16 or 32, and
    at a multiple of 32, without re-export: equal to the reference model called at that size."""
    ort_eng = Engine(tiny_export, backend="ort", task="superres")
    ref = torch_engines("superres")
    for i, (b, h, w) in enumerate(OFFICIAL_CROP_SIZES + [(1, 64, 96)]):
        x, wplus = engine_inputs(ort_eng, b, h, w, seed=10 + i)
        seeds = [i + 1, i + 2][:b]
        y = ort_eng.synthesize_float(x, wplus, seed=seeds)
        want = reference_call(ref, x, wplus, seed=seeds)
        assert y.shape == want.shape == (b, 3, 4 * h, 4 * w)
        assert_close_scaled(y, want, 1e-4)


def test_engine_refuses_bad_artifacts(tiny_export, tmp_path):
    with pytest.raises(SgexError, match="not 'toonify'"):
        Engine(tiny_export, backend="ort", task="toonify")
    bad = tmp_path / "superres"
    shutil.copytree(tiny_export, bad)
    style = bad / "style" / "style.onnx"
    style.write_bytes(style.read_bytes() + b"\0")
    with pytest.raises(SgexError, match="sha256 does not match"):
        Engine(bad, backend="ort")
    style.unlink()
    with pytest.raises(SgexError, match="missing"):
        Engine(bad, backend="ort")
    with pytest.raises(SgexError, match="no TensorRT engines"):
        Engine(tiny_export, backend="trt")
    assert Engine(tiny_export.parent, backend="ort", task="superres").task == "superres"  # export root accepted


def test_backend_choice_rules(caplog):
    from types import SimpleNamespace

    from runtime.backends import resolve
    from runtime.backends.ort import choose_providers

    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(gpu, None)[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert choose_providers(gpu, "cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert choose_providers(gpu, "cpu") == ["CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider"], None) == ["CPUExecutionProvider"]
    with pytest.raises(SgexError, match="onnxruntime-gpu"):
        choose_providers(["CPUExecutionProvider"], "cuda")
    caplog.set_level("INFO")
    assert resolve("auto", SimpleNamespace(engines={})) == "ort"
    with_engines = SimpleNamespace(engines={"synth@32": {}})
    expect = "trt" if __import__("runtime.backends").backends.tensorrt_importable()[0] else "ort"
    assert resolve("auto", with_engines) == expect
    assert any("backend auto ->" in r.getMessage() for r in caplog.records)  # the choice is logged
    with pytest.raises(SgexError, match="does not run exported artifacts"):
        resolve("torch", with_engines)


@pytest.mark.slow
def test_ort_plugin_flavor_equals_torch(tmp_path, tiny_ckpt, torch_engines):
    """The plugin flavor (one FusedModulatedConv2d node per modulated conv, run by the
    onnxruntime-extensions Python op) gives the torch backend's numbers too."""
    onnx_mod = pytest.importorskip("export.onnx")
    pytest.importorskip("onnxruntime_extensions")
    onnx_mod.export_task("superres", 32, ckpt=tiny_ckpt("superres"), out=tmp_path, max_batch=2, flavor="plugin",
                         progress=False)
    eng = Engine(tmp_path / "superres", backend="ort")
    ref = torch_engines("superres")
    rng = np.random.default_rng(4)
    x1 = rng.integers(0, 256, (2, 30, 20, 3), dtype=np.uint8)
    w = realistic(ref.compute_style(rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)))
    np.testing.assert_allclose(eng.synthesize_float(x1, w, seed=[5, 6]), ref.synthesize_float(x1, w, seed=[5, 6]),
                               atol=1e-4)

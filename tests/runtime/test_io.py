"""runtime.io: decoding, per-task checks, the official pre/post-processing numbers, atomic writes.
Pure numpy/OpenCV, no model."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from runtime import io as rio
from runtime.errors import SgexError
from runtime.tasks import get_task


def _png(path, img):
    assert cv2.imwrite(str(path), img)
    return path


def test_read_image_rgb_order_and_grey(tmp_path):
    bgr = np.zeros((5, 7, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV order
    rgb = rio.read_image(_png(tmp_path / "a.png", bgr))
    assert rgb.shape == (5, 7, 3) and rgb[0, 0].tolist() == [0, 0, 200]
    grey = rio.read_image(_png(tmp_path / "g.png", np.full((5, 7), 9, np.uint8)))
    assert grey.shape == (5, 7) and grey.dtype == np.uint8


@pytest.mark.parametrize("case", ["missing", "empty", "text", "dir", "16bit"])
def test_read_image_errors(tmp_path, case):
    p = tmp_path / "x.png"
    if case == "empty":
        p.write_bytes(b"")
    elif case == "text":
        p.write_text("not an image")
    elif case == "dir":
        p.mkdir()
    elif case == "16bit":
        _png(p, np.zeros((4, 4, 3), np.uint16))
    word = {"missing": "no such file", "empty": "empty", "text": "not an image", "dir": "directory", "16bit": "8-bit"}[case]
    with pytest.raises(SgexError, match=word):
        rio.read_image(p)


def test_task_image_channels():
    rgb = np.zeros((6, 8, 3), np.uint8)
    grey = np.zeros((6, 8), np.uint8)
    assert rio.task_image(rgb, get_task("superres")).shape == (6, 8, 3)
    with pytest.raises(SgexError, match="needs 3 channels.*got 1"):
        rio.task_image(grey, get_task("toonify"))
    with pytest.raises(SgexError, match="got 4"):
        rio.task_image(np.zeros((6, 8, 4), np.uint8), get_task("edit"))
    rgb[..., 0] = 7
    assert (rio.task_image(rgb, get_task("sketch2face")) == 7).all()  # channel 0, as the web UI
    with pytest.raises(SgexError, match="1-channel label map"):
        rio.task_image(rgb, get_task("mask2face"))
    with pytest.raises(SgexError, match="0..18, found 19"):
        rio.task_image(np.full((6, 8), 19, np.uint8), get_task("mask2face"))
    with pytest.raises(SgexError, match="dtype must be uint8"):
        rio.task_image(rgb.astype(np.float32), get_task("superres"))


def test_check_batch_and_x2_name_the_dimension():
    with pytest.raises(SgexError, match=r"channels \(dimension 3"):
        rio.check_batch(np.zeros((1, 4, 4, 4), np.uint8), 3, "x1")
    with pytest.raises(SgexError, match="expected \\[B, H, W, 3\\]"):
        rio.check_batch(np.zeros((4, 4, 3), np.uint8), 3, "x1")
    with pytest.raises(SgexError, match=r"width \(dimension 2"):
        rio.check_x2(np.zeros((256, 200, 3), np.uint8))
    assert rio.check_x2(np.zeros((256, 256, 3), np.uint8)).shape == (1, 256, 256, 3)


def test_normalisation_matches_official_numbers():
    u = np.array([[[[0, 128, 255]]]], np.uint8)  # [1,1,1,3]
    x = rio.rgb_to_model(u)
    assert x.shape == (1, 3, 1, 1) and x.dtype == np.float32
    expect = (np.float32([0, 128, 255]) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(x[0, :, 0, 0], expect)
    s = rio.sketch_to_model(np.array([[[0, 255]]], np.uint8))
    assert s.shape == (1, 1, 1, 2) and s.max() == 1.0 and s.min() == 0.0
    m = rio.mask_to_model(np.array([[[0, 18, 5]]], np.uint8))
    assert m.shape == (1, 19, 1, 3) and m.sum() == 3 and m[0, 18, 0, 1] == 1 and m[0, 5, 0, 2] == 1


def test_to_uint8_clamps_and_truncates():
    y = np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0, 0.0039], np.float32).reshape(1, 1, 1, -1)
    y = np.repeat(y, 3, axis=1)
    u = rio.to_uint8(y)
    assert u.shape == (1, 1, 7, 3)
    # (0+1)*127.5 = 127.5 -> 127 (truncation, not rounding); 0.999 -> 254.87 -> 254
    assert u[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255, 127]


def test_pad_only_sides_not_multiple_of_8_reflect_and_crop():
    x = np.arange(40 * 50, dtype=np.int32).reshape(1, 40, 50) % 251
    x = np.stack([x] * 3, -1).astype(np.uint8)
    p = rio.pad_to_multiple(x)
    assert p.shape == (1, 40, 56, 3)  # 40 is a multiple of 8: untouched; 50 -> 56
    np.testing.assert_array_equal(p[:, :40, :50], x)
    np.testing.assert_array_equal(p[0, :40, 50], x[0, :, 48])  # reflect: column 50 mirrors 48
    np.testing.assert_array_equal(p[0, :40, 55], x[0, :, 43])
    assert rio.pad_to_multiple(p) is p
    for h, w in ((72, 88), (40, 56), (8, 8)):  # multiples of 8 (not of 16/32) reach the model as they are
        a = np.zeros((2, h, w, 3), np.uint8)
        assert rio.pad_to_multiple(a) is a
    q = rio.pad_to_multiple(np.zeros((1, 33, 16), np.uint8))
    assert q.shape == (1, 40, 16)
    y = np.zeros((1, 3, 160, 224), np.float32)
    assert rio.crop_output(y, 40, 50).shape == (1, 3, 160, 200)
    assert rio.crop_output(y, 40, 56) is y


def test_centre_square_x2():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255  # the centre square is all white
    x2 = rio.centre_square_x2(img)
    assert x2.shape == (256, 256, 3) and x2.min() == 255
    assert rio.centre_square_x2(np.zeros((600, 400, 3), np.uint8)).shape == (256, 256, 3)


def _photo(h, w, seed=0):
    """A smooth random colour field with noise: structure at every scale, all 0..255 values."""
    import cv2

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 7, 3)).astype(np.float32)
    img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 20, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_scale_resize_is_pil_bicubic_with_floor_sizes():
    """spec 4.1 raw path: PIL resize to (w*rf//4, h*rf//4), bicubic, bit for bit."""
    from PIL import Image

    img = _photo(37, 45)
    for scale, want in ((8, (74, 90)), (12, (111, 135)), (20, (185, 225))):
        got = rio.resize_for_scale(img, scale)
        assert got.shape == (*want, 3)
        ref = np.asarray(Image.fromarray(img).resize((45 * scale // 4, 37 * scale // 4), Image.BICUBIC))
        np.testing.assert_array_equal(got, ref)
    assert rio.resize_for_scale(img, 4) is img
    assert rio.resize_for_scale(np.zeros((10, 13, 3), np.uint8), 6).shape == (15, 19, 3)  # floor, not round


def _official_bicubic_downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """spec 4.1 BicubicDownSample, written from the spec's words with torch (float64), independent of
    runtime.io: kernel of 4*factor taps cubic((i - floor(size/2) + 0.5)/factor), a = -0.5, sum 1;
    reflect padding 3*factor per axis (top/left = half, floored); stride factor; vertical pass, then
    horizontal; clamp [0, 1]; x255 and truncation. Returns the float result before x255 too."""
    import torch
    import torch.nn.functional as F

    size, a = 4 * factor, -0.5

    def cubic(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        if x < 2:
            return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
        return 0.0

    k = torch.tensor([cubic((i - size // 2 + 0.5) / factor) for i in range(size)], dtype=torch.float64)
    k = k / k.sum()
    t = torch.from_numpy(img).double().permute(2, 0, 1)[:, None] / 255.0  # [3, 1, H, W]
    pad = 3 * factor
    t = F.pad(t, (0, 0, pad // 2, pad - pad // 2), mode="reflect")
    t = F.conv2d(t, k.view(1, 1, size, 1), stride=(factor, 1))
    t = F.pad(t, (pad // 2, pad - pad // 2, 0, 0), mode="reflect")
    t = F.conv2d(t, k.view(1, 1, 1, size), stride=(1, factor))
    f = t.clamp(0, 1)[:, 0].permute(1, 2, 0).numpy()
    return (f * 255).astype(np.uint8), f * 255


@pytest.mark.parametrize("scale", [4, 8, 32])
def test_simulate_lr_is_the_official_bicubic_downsample_then_pil_bicubic(scale):
    pytest.importorskip("torch")
    from PIL import Image

    factor = scale // 4
    img = _photo(64, 72, seed=scale)
    x1, lr = rio.simulate_lr(img, scale)
    ref_u8, ref_f = _official_bicubic_downsample(img, factor)
    assert lr.shape == ref_u8.shape == (64 // factor, 72 // factor, 3)
    # float32 (sgex) against float64 (here) differs in the last bits: a value may truncate to the
    # neighbour only where the float64 value is within 1e-3 of an integer
    near = (np.abs(ref_f - np.round(ref_f)) < 1e-3) & (ref_f > 0) & (ref_f < 255)  # clamped ends are exact
    np.testing.assert_array_equal(lr[~near], ref_u8[~near])
    assert (np.abs(lr.astype(int) - ref_u8) <= 1).all() and (lr != ref_u8).mean() < 0.005
    assert x1.shape == img.shape
    np.testing.assert_array_equal(x1, np.asarray(Image.fromarray(lr).resize((72, 64), Image.BICUBIC)))
    if factor == 1:  # not the identity: a 4-tap half-pixel shift
        assert not np.array_equal(lr, img)


def test_write_image_atomic_and_output_checks(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    out = rio.write_image(tmp_path / "o.png", img)
    np.testing.assert_array_equal(rio.read_image(out), img)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]  # no temp file left
    assert out.stat().st_mode & 0o777 == 0o666 & ~rio._umask()  # not mkstemp's 0600
    with pytest.raises(SgexError, match="does not exist"):
        rio.check_output_path(tmp_path / "missing" / "o.png", "image")
    with pytest.raises(SgexError, match="is a directory"):
        rio.check_output_path(tmp_path, "image")
    with pytest.raises(SgexError, match="must be an image"):
        rio.check_output_path(tmp_path / "o.txt", "image")
    with pytest.raises(SgexError, match="must be a video"):
        rio.check_output_path(tmp_path / "o.png", "video")
    with pytest.raises(SgexError, match="must be a folder"):
        rio.check_output_path(out, "folder")
    with pytest.raises(SgexError, match="not writable"):
        rio.check_output_path("/proc/sgex-test.png", "image")
    assert rio.check_output_path(tmp_path / "new", "folder").name == "new"


def test_atomic_output_removes_temp_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with rio.atomic_output(tmp_path / "v.mp4") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_list_images(tmp_path):
    with pytest.raises(SgexError, match="no image files"):
        rio.list_images(tmp_path)
    for n in ("b.png", "a.jpg", "c.txt"):
        (tmp_path / n).write_bytes(b"x")
    assert [p.name for p in rio.list_images(tmp_path)] == ["a.jpg", "b.png"]

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


def test_pad_reflect_and_crop():
    x = np.arange(40 * 50, dtype=np.int32).reshape(1, 40, 50) % 251
    x = np.stack([x] * 3, -1).astype(np.uint8)
    p = rio.pad_to_multiple(x)
    assert p.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(p[:, :40, :50], x)
    np.testing.assert_array_equal(p[0, 40, :50], x[0, 38])  # reflect: row 40 mirrors row 38
    np.testing.assert_array_equal(p[0, :40, 50], x[0, :, 48])
    assert rio.pad_to_multiple(p) is p
    y = np.zeros((1, 3, 256, 256), np.float32)
    assert rio.crop_output(y, 40, 50).shape == (1, 3, 160, 200)


def test_centre_square_and_scale_resize():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255  # the centre square is all white
    x2 = rio.centre_square_x2(img)
    assert x2.shape == (256, 256, 3) and x2.min() == 255
    assert rio.centre_square_x2(np.zeros((600, 400, 3), np.uint8)).shape == (256, 256, 3)
    assert rio.resize_for_scale(np.zeros((10, 12, 3), np.uint8), 8).shape == (20, 24, 3)
    assert rio.resize_for_scale(np.zeros((10, 12, 3), np.uint8), 4).shape == (10, 12, 3)


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

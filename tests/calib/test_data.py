"""Calibration inputs (calib.data) and one-line errors for bad calibration data."""

from __future__ import annotations

import numpy as np
import pytest

from calib.data import graph_feeds, load_samples
from runtime.errors import SgexError
from runtime.tasks import N_NOISE, noise_shapes


def _write_png(path, img):
    import cv2

    assert cv2.imwrite(str(path), img)


@pytest.mark.parametrize("task,channels,lo,hi", [("superres", 3, -1, 1), ("sketch2face", 1, 0, 1), ("mask2face", 19, 0, 1)])
def test_synthetic_samples_shapes_ranges_and_determinism(task, channels, lo, hi):
    a = load_samples(task, 256, None, samples=3, seed=5)
    b = load_samples(task, 256, None, samples=3, seed=5)
    assert len(a) == 3
    for s, t in zip(a, b):
        assert s.x1.shape == (1, channels, 64, 64) and s.x1.dtype == np.float32
        assert lo <= s.x1.min() and s.x1.max() <= hi
        np.testing.assert_array_equal(s.x1, t.x1)
        if channels == 3:
            assert s.x2.shape == (1, 3, 256, 256)
        else:
            assert s.x2 is None
        if channels == 19:
            np.testing.assert_array_equal(s.x1.sum(axis=1), 1.0)  # one-hot
    assert [s.seed for s in a] == [5, 6, 7]
    assert not np.array_equal(a[0].x1, a[1].x1)


def test_folder_images_are_cropped_and_padded_like_the_runtime(tmp_path):
    rng = np.random.default_rng(0)
    _write_png(tmp_path / "a.png", rng.integers(0, 255, (70, 50, 3), dtype=np.uint8))
    _write_png(tmp_path / "b.png", rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    s = load_samples("superres", 256, str(tmp_path), samples=4, seed=0)
    assert [x.name for x in s] == ["a.png", "b.png"]
    assert s[0].x1.shape == (1, 3, 64, 56)  # bucket 256 (x1 <= 64): 70x50 -> crop 64 rows, pad 50 -> 56
    assert s[1].x1.shape == (1, 3, 64, 64)  # centre crop of a larger image
    assert s[0].x2.shape == (1, 3, 256, 256)


def test_feeds_follow_the_runtime_noise_and_z(tmp_path):
    from runtime.engine import make_random_inputs

    s = load_samples("sketch2face", 256, None, samples=1, seed=3)[0]
    names = ["x", "z"] + [f"noise_{j}" for j in range(N_NOISE)]
    f = graph_feeds(names, s, style_dim=128)
    ref = make_random_inputs(3, 1, 64, 64, noise=True, z_dim=128)
    for k in ref:
        np.testing.assert_array_equal(f[k], ref[k])
    assert f["noise_16"].shape == (1, 1, *noise_shapes(64, 64)[16])
    edit = load_samples("edit", 256, None, samples=2, seed=0)
    ew = np.ones((1, 18, 128), np.float32)
    f0 = graph_feeds(["x1", "wplus", "editing_w"], edit[0], style_dim=128, wplus=ew, editing_w=ew, index=0)
    f1 = graph_feeds(["x1", "wplus", "editing_w"], edit[1], style_dim=128, wplus=ew, editing_w=ew, index=1)
    assert f0["editing_w"][0, 0, 0] == 1.0 and f1["editing_w"][0, 0, 0] == -1.0  # scales cycle over the UI range


def test_bad_data_raises_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SgexError, match="no image files"):
        load_samples("superres", 256, str(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"definitely not a png")
    with pytest.raises(SgexError, match="not an image sgex can read"):
        load_samples("superres", 256, str(bad))
    vid = tmp_path / "clip.mp4"
    vid.write_bytes(b"\x00" * 64)
    with pytest.raises(SgexError, match="video"):
        load_samples("superres", 256, str(vid))
    with pytest.raises(SgexError, match="does not exist"):
        load_samples("superres", 256, str(tmp_path / "missing"))
    colour = tmp_path / "colour"
    colour.mkdir()
    _write_png(colour / "m.png", np.full((40, 40, 3), 200, np.uint8))
    with pytest.raises(SgexError, match="label map|1-channel"):
        load_samples("mask2face", 256, str(colour))


def test_video_frames_spread_over_the_clip(tmp_path):
    import cv2

    path = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (48, 40))
    assert w.isOpened()
    for i in range(9):
        w.write(np.full((40, 48, 3), 20 * i, np.uint8))
    w.release()
    s = load_samples("superres", 256, str(path), samples=3, seed=0)
    assert [x.name for x in s] == ["clip.avi#0", "clip.avi#4", "clip.avi#8"]
    assert s[0].x1.shape == (1, 3, 40, 48)  # multiples of 8: the frame as it is, no padding
    assert s[0].x1.mean() < s[2].x1.mean()


def test_cli_bad_data_exit_2_one_line(tmp_path, capsys):
    from calib.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "plan.json"
    rc = main(["--task", "superres", "--res", "256", "--random-weights", "--width-div", "4",
               "--data", str(empty), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("sgex-calib: error:") and "no image files" in err[0]
    assert not out.exists()
    vid = tmp_path / "novid.mp4"
    vid.write_bytes(b"")
    rc = main(["--task", "edit", "--res", "256", "--random-weights", "--data", str(vid), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "novid.mp4" in err[0]
    rc = main(["--task", "superres", "--res", "256", "--out", str(out)])
    assert rc == 2 and "--random-weights" in capsys.readouterr().err


def test_cli_help_lists_examples(capsys):
    from calib.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--target-psnr" in out and "--headroom" in out

"""runtime.video: streamed decode/encode, frame count and fps kept, temp-then-rename, through the
engine's per-frame path (a fake backend here; the CLI test runs the torch backend on a video)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest

from runtime.backends.base import Backend
from runtime.buckets import Bucket
from runtime.engine import Engine, _default_inputs
from runtime.errors import SgexError
from runtime.tasks import get_task
from runtime.video import Progress, VideoReader, VideoWriter, write_video


class Upsample4(Backend):
    """style: zeros; synth: y = nearest 4x upsample of x1 (the video plumbing, not the model)."""

    name = "fake"

    def run(self, key, feeds):
        if key == "style":
            return {"wplus": np.zeros((feeds["x2"].shape[0], 18, 8), np.float32)}
        return {"y": np.repeat(np.repeat(feeds["x1"], 4, axis=2), 4, axis=3)}

    def describe(self):
        return "fake"


def fake_engine(task):
    spec = get_task(task)
    eng = Engine.__new__(Engine)
    eng._setup(spec, spec.default_variant.name, 8, Upsample4(), manifest=None, buckets=[Bucket(256, 2)],
               inputs=_default_inputs(spec), editing_w=None, artifacts_dir=None)
    return eng


def make_video(path, frames=5, fps=12.0, size=(40, 32)):
    """A tiny synthetic clip written with OpenCV: frame i is a flat grey of level 40*i."""
    w, h = size
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert vw.isOpened()
    for i in range(frames):
        vw.write(np.full((h, w, 3), 40 * i, np.uint8))
    vw.release()
    return path


def count_frames(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    fps = cap.get(cv2.CAP_PROP_FPS)
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    cap.release()
    return n, fps, size


def test_reader_info_and_frames(tmp_path):
    src = make_video(tmp_path / "in.mp4")
    r = VideoReader(src)
    assert (r.info.frames, r.info.fps, r.info.width, r.info.height) == (5, 12.0, 40, 32)
    frames = list(r)
    assert len(frames) == 5 and frames[0].shape == (32, 40, 3) and frames[0].dtype == np.uint8
    assert abs(int(frames[3].mean()) - 120) <= 3  # decoded levels survive mp4v


@pytest.mark.parametrize("ext", [".mp4", ".avi", ".mkv"])
def test_round_trip_through_engine_keeps_count_fps_and_scales_4x(tmp_path, ext):
    src = make_video(tmp_path / "in.mp4", frames=5, fps=15.0)
    reader = VideoReader(src)
    eng = fake_engine("toonify")
    out = tmp_path / f"out{ext}"
    n = write_video(out, eng.process_video(reader, batch_size=2), reader.info.fps, total=reader.info.frames,
                    progress=False)
    assert n == 5
    assert count_frames(out) == (5, 15.0, (160, 128))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.mp4", out.name])


def test_failed_encode_leaves_no_file(tmp_path):
    def frames():
        yield np.zeros((32, 32, 3), np.uint8)
        raise SgexError("frame 1: bad")

    with pytest.raises(SgexError, match="frame 1"):
        write_video(tmp_path / "o.mp4", frames(), 10.0, progress=False)
    with pytest.raises(SgexError, match="no frames to write"):
        write_video(tmp_path / "o.mp4", iter([]), 10.0, progress=False)
    with pytest.raises(SgexError, match="differs from the first frame"):
        with VideoWriter(tmp_path / "o.mp4", 10.0) as vw:
            vw.write(np.zeros((32, 32, 3), np.uint8))
            vw.write(np.zeros((32, 64, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["zero_frames", "empty", "junk", "missing"])
def test_bad_videos(tmp_path, case):
    p = tmp_path / "v.mp4"
    if case == "zero_frames":
        cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"mp4v"), 10, (32, 32)).release()
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "junk":
        p.write_bytes(b"not a video" * 50)
    word = {"zero_frames": "no frames|cannot decode|can decode", "empty": "empty file", "junk": "decode",
            "missing": "no such file"}[case]
    with pytest.raises(SgexError, match=word):
        VideoReader(p)


def test_progress_draws_when_forced():
    buf = io.StringIO()
    bar = Progress(3, force=True, interval=0.0, stream=buf)
    for _ in range(3):
        bar.update()
    bar.close()
    assert "frames 3/3 100%" in buf.getvalue() and buf.getvalue().endswith("\n")

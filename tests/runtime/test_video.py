"""runtime.video: PyAV and OpenCV decode/encode, the decode -> engine -> encode pipeline, audio
copied untouched, frame exactness, damaged input, failures leaving nothing behind. The engine is a
fake backend (nearest 4x upsample: the plumbing, not the model); test_run_cli.py and
test_video_signals.py run the torch backend through sgex-run."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.backends.base import Backend
from runtime.buckets import Bucket
from runtime.engine import Engine, _default_inputs
from runtime.errors import MissingDependency, SgexError
from runtime.tasks import get_task
from runtime.video import (Progress, VideoReader, VideoWriter, count_frames, resolve_encoding, run_video,
                           write_test_clip, write_video)

av = pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[2]
BITS = 8  # a frame's index is written as 8 black/white blocks along its top edge


class Upsample4(Backend):
    """style: zeros; synth: y = nearest 4x upsample of x1 (the video plumbing, not the model)."""

    name = "fake"

    def run(self, key, feeds):
        if key == "style":
            return {"wplus": np.zeros((feeds["x2"].shape[0], 18, 8), np.float32)}
        return {"y": np.repeat(np.repeat(feeds["x1"], 4, axis=2), 4, axis=3)}

    def describe(self):
        return "fake"


def fake_engine(task="toonify"):
    spec = get_task(task)
    eng = Engine.__new__(Engine)
    eng._setup(spec, spec.default_variant.name, 8, Upsample4(), manifest=None, buckets=[Bucket(256, 2)],
               inputs=_default_inputs(spec), editing_w=None, artifacts_dir=None)
    return eng


def process(batch=1):
    eng = fake_engine()
    return lambda frames: eng.process_video(frames, batch_size=batch)


def index_frame(i, size=(64, 48)):
    """uint8 RGB [h, w, 3]: grey 128 with the bits of i as black/white blocks in the top band."""
    w, h = size
    img = np.full((h, w, 3), 128, np.uint8)
    bw = w // BITS
    for b in range(BITS):
        img[: h // 3, b * bw:(b + 1) * bw] = 255 if (i >> b) & 1 else 0
    return img


def read_index(img):
    h, w = img.shape[:2]
    bw = w // BITS
    return sum(1 << b for b in range(BITS) if img[h // 6, b * bw + bw // 2].mean() > 128)


def make_clip(path, frames=10, fps=12, size=(64, 48), *, audio_s=None, crf=0, frame=index_frame):
    """An H.264 clip made with PyAV (lossless, crf 0: the index pattern reads back exactly) and,
    with `audio_s`, an AAC 440 Hz tone of that many seconds on a second stream."""
    write_test_clip(path, (frame(i, size) for i in range(frames)), fps, crf=crf, tone_s=audio_s)
    return path


def audio_packets(path):
    """[(start seconds, bytes)] of the first audio stream's packets."""
    with av.open(str(path)) as c:
        return [(float(p.pts * p.time_base), bytes(p)) for p in c.demux(c.streams.audio[0]) if p.dts is not None]


def decoded(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def cv_mp4(path, frames=5, fps=12.0, size=(40, 32)):
    """A tiny clip written with OpenCV (mp4v): frame i is a flat grey of level 40*i."""
    w, h = size
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert vw.isOpened()
    for i in range(frames):
        vw.write(np.full((h, w, 3), 40 * i, np.uint8))
    vw.release()
    return path


def cv_count(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    fps = cap.get(cv2.CAP_PROP_FPS)
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    cap.release()
    return n, fps, size


class _BlockAv:
    def find_spec(self, name, path=None, target=None):
        if name == "av" or name.startswith("av."):
            raise ImportError(f"No module named {name!r} (blocked by test)")
        return None


@pytest.fixture
def no_av(monkeypatch):
    """A machine without the `video` extra: `import av` fails for the duration of a test."""
    for name in list(sys.modules):
        if name == "av" or name.startswith("av."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BlockAv(), *sys.meta_path])


def listing(d):
    return sorted(p.name for p in d.iterdir())


# -- PyAV: H.264, audio, timing, frame exactness -------------------------------------------------

@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_h264_keeps_count_fps_time_base_and_audio_packets(tmp_path, ext):
    # the tone runs 0.5 s past the last frame: it must be cut, the rest copied byte for byte
    src = make_clip(tmp_path / "in.mp4", frames=10, fps=12, audio_s=10 / 12 + 0.5)
    reader = VideoReader(src)
    assert reader.lib == "av" and reader.info.frames == 10 and reader.info.audio
    out = tmp_path / f"out{ext}"
    enc = resolve_encoding(out, reader.lib, source=reader.info)
    assert (enc.codec, enc.crf) == ("libx264", 18)
    assert run_video(reader, out, process(batch=3), encoding=enc, progress=False) == 10
    assert listing(tmp_path) == sorted(["in.mp4", out.name])

    with av.open(str(src)) as s, av.open(str(out)) as o:
        sv, ov = s.streams.video[0], o.streams.video[0]
        assert ov.codec_context.name == "h264" and ov.codec_context.pix_fmt == "yuv420p"
        assert (ov.width, ov.height) == (256, 192)
        assert ov.average_rate == sv.average_rate == 12
        if ext == ".mp4":
            assert ov.time_base == sv.time_base and ov.frames == 10
        src_pts = [float(f.pts * f.time_base) for f in s.decode(sv)]
        out_pts = [float(f.pts * f.time_base) for f in o.decode(ov)]
    # Matroska cannot store the AAC priming packet's negative time: its muxer shifts every stream
    # by the same offset (23 ms here), so A/V sync holds; MP4 keeps the times (edit list)
    shift = out_pts[0] - src_pts[0]
    assert shift == pytest.approx(0.0 if ext == ".mp4" else 1024 / 44100, abs=1e-3)
    assert out_pts == pytest.approx([t + shift for t in src_pts], abs=1e-3) and len(out_pts) == 10
    video_end = 10 / 12
    src_a, out_a = audio_packets(src), audio_packets(out)
    kept = [p for p in src_a if p[0] < video_end]
    assert len(kept) < len(src_a)  # the tone was longer than the video
    assert [b for _, b in out_a] == [b for _, b in kept]  # untouched: identical packet bytes
    assert [t for t, _ in out_a] == pytest.approx([t + shift for t, _ in kept], abs=1e-3)


@pytest.mark.parametrize("pipelined, batch", [(True, 1), (True, 3), (False, 2)])
def test_output_frame_i_comes_from_input_frame_i(tmp_path, pipelined, batch):
    n = 40  # more frames than the queues hold, so the stages really overlap
    src = make_clip(tmp_path / "in.mp4", frames=n)
    reader = VideoReader(src)
    out = tmp_path / "out.mp4"
    enc = resolve_encoding(out, "av", crf=0)
    assert run_video(reader, out, process(batch), encoding=enc, pipelined=pipelined, queue_frames=2,
                     progress=False) == n
    frames = decoded(out)
    assert [read_index(f) for f in frames] == list(range(n))
    # crf 0 (lossless in yuv420p): the fake engine's exact 4x nearest upsample survives
    assert np.array_equal(frames[7], np.repeat(np.repeat(index_frame(7), 4, 0), 4, 1))


def test_encoder_choices_are_checked_before_any_work(tmp_path):
    out = tmp_path / "o.mp4"
    with pytest.raises(SgexError, match="not a video encoder"):
        resolve_encoding(out, "av", codec="nope264")
    with pytest.raises(SgexError, match="not a video encoder"):
        resolve_encoding(out, "av", codec="aac")
    with pytest.raises(SgexError, match="--crf must be 0..51"):
        resolve_encoding(out, "av", crf=52)
    with pytest.raises(SgexError, match="--crf applies to"):
        resolve_encoding(out, "av", codec="mpeg4", crf=10)
    with pytest.raises(SgexError, match="cannot write '.flv'"):
        resolve_encoding(tmp_path / "o.flv", "av")
    assert resolve_encoding(tmp_path / "o.webm", "av").codec == "libvpx-vp9"
    assert resolve_encoding(out, "av", codec="mpeg4").crf is None
    assert list(tmp_path.iterdir()) == []


def test_audio_that_the_container_cannot_hold_is_refused_up_front(tmp_path):
    src = tmp_path / "pcm.mkv"
    c = av.open(str(src), "w")
    vs = c.add_stream("libx264", rate=10)
    vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
    a = c.add_stream("pcm_s16le", rate=8000)
    a.layout = "mono"
    for i in range(3):
        for p in vs.encode(av.VideoFrame.from_ndarray(index_frame(i, (32, 32)), format="rgb24")):
            c.mux(p)
    for p in vs.encode():
        c.mux(p)
    af = av.AudioFrame.from_ndarray(np.zeros((1, 2400), np.int16), format="s16", layout="mono")
    af.sample_rate, af.pts = 8000, 0
    for p in a.encode(af):
        c.mux(p)
    c.close()
    info = VideoReader(src).info
    with pytest.raises(SgexError, match="pcm_s16le audio cannot be copied into .webm"):
        resolve_encoding(tmp_path / "o.webm", "av", source=info)
    assert resolve_encoding(tmp_path / "o.mkv", "av", source=info).codec == "libx264"


# -- without PyAV: OpenCV, said once -------------------------------------------------------------

def test_without_av_opencv_runs_and_says_once_that_audio_is_dropped(tmp_path, no_av, caplog):
    src = cv_mp4(tmp_path / "in.mp4", frames=5, fps=15.0)
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.INFO, logger="runtime.video"):
        reader = VideoReader(src)
        enc = resolve_encoding(out, reader.lib, source=reader.info)
        assert run_video(reader, out, process(2), encoding=enc, progress=False) == 5
    assert reader.lib == "opencv" and enc.codec == "mp4v"
    said = [r for r in caplog.records if "audio is dropped" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING" and "sgex[video]" in said[0].getMessage()
    assert cv_count(out) == (5, 15.0, (160, 128))
    assert listing(tmp_path) == ["in.mp4", "out.mp4"]
    with pytest.raises(MissingDependency, match=r"sgex\[video\]"):
        resolve_encoding(out, "opencv", crf=20)
    with pytest.raises(MissingDependency, match=r"sgex\[video\]"):
        VideoReader(src, lib="av")
    assert "av" not in sys.modules


@pytest.mark.parametrize("ext", [".mp4", ".avi", ".mkv"])
def test_round_trip_keeps_count_fps_and_scales_4x(tmp_path, ext):
    src = cv_mp4(tmp_path / "in.mp4", frames=5, fps=15.0)
    reader = VideoReader(src)
    out = tmp_path / f"out{ext}"
    n = write_video(out, fake_engine().process_video(reader, batch_size=2), reader.info.fps,
                    total=reader.info.frames, progress=False)
    assert n == 5
    assert cv_count(out) == (5, 15.0, (160, 128))
    assert listing(tmp_path) == sorted(["in.mp4", out.name])


# -- damaged input: an error, never a silently shorter output -----------------------------------

def damaged_avi(path, frames=10):
    """An MJPG AVI (the container declares `frames`) with 15% of its bytes overwritten by noise in
    one run from 30% of the file: the index survives, some frames do not."""
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        vw.write(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    vw.release()
    data = bytearray(path.read_bytes())
    a = int(0.3 * len(data))
    b = a + int(0.15 * len(data))
    data[a:b] = rng.integers(0, 256, b - a, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("lib", ["av", "opencv"])
def test_damaged_video_is_an_error_and_keeps_the_existing_output(tmp_path, lib):
    src = damaged_avi(tmp_path / "bad.avi")
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    reader = VideoReader(src, lib=lib)
    assert reader.info.frames == 10
    if lib == "av":
        with pytest.raises(SgexError, match="holds 8 of the 10 frames the container declares"):
            reader.check_complete()
    enc = resolve_encoding(out, lib)
    with pytest.raises(SgexError, match=r"decoded \d of the 10 frames the container declares"):
        run_video(reader, out, process(), encoding=enc, progress=False)
    assert out.read_bytes() == b"previous result"
    assert listing(tmp_path) == ["bad.avi", "out.mp4"]


def test_damaged_video_through_sgex_run_exits_2_with_one_line(tmp_path, capsys):
    from runtime.cli import main

    src = damaged_avi(tmp_path / "bad.avi")
    out = tmp_path / "out.mp4"
    rc = main(["--task", "toonify", "--backend", "torch", "--random-weights", "--width-div", "4", "--no-align",
               "--input", str(src), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    # found before the model loads: the error is the only line (the packets are counted first)
    assert len(lines) == 1 and lines[0].startswith("sgex-run: error"), err
    assert "holds 8 of the 10 frames the container declares" in lines[0], err
    assert listing(tmp_path) == ["bad.avi"]


# -- failures and interruption leave nothing behind ----------------------------------------------

@pytest.mark.parametrize("exc", [SgexError("engine failed at frame 5"), KeyboardInterrupt()])
@pytest.mark.parametrize("pipelined", [True, False])
def test_failure_mid_clip_stops_every_thread_and_keeps_the_old_output(tmp_path, exc, pipelined):
    src = make_clip(tmp_path / "in.mp4", frames=30, audio_s=1.0)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    eng = process(2)

    def failing(frames):
        for i, y in enumerate(eng(frames)):
            if i == 5:
                raise exc
            yield y

    reader = VideoReader(src)
    with pytest.raises(type(exc)):
        run_video(reader, out, failing, pipelined=pipelined, queue_frames=2, progress=False)
    assert out.read_bytes() == b"previous result"
    assert listing(tmp_path) == ["in.mp4", "out.mp4"]
    assert not [t for t in threading.enumerate() if t.name.startswith("sgex-")]


def test_encoder_failure_reaches_the_caller(tmp_path, monkeypatch):
    src = make_clip(tmp_path / "in.mp4", frames=20)
    out = tmp_path / "out.mp4"
    real = VideoWriter.write

    def write(self, frame, pts=None):
        if self.frames == 4:
            raise OSError(28, "No space left on device")
        real(self, frame, pts)

    monkeypatch.setattr(VideoWriter, "write", write)
    # atomic_output turns the OSError into one user-facing line naming the output
    with pytest.raises(SgexError, match="out.mp4: writing failed .No space left"):
        run_video(VideoReader(src), out, process(), queue_frames=2, progress=False)
    assert listing(tmp_path) == ["in.mp4"]
    assert not [t for t in threading.enumerate() if t.name.startswith("sgex-")]


def test_failed_encode_leaves_no_file(tmp_path):
    def frames():
        yield np.zeros((32, 32, 3), np.uint8)
        raise SgexError("frame 1: bad")

    for lib in ("av", "opencv"):
        with pytest.raises(SgexError, match="frame 1"):
            write_video(tmp_path / "o.mp4", frames(), 10.0, progress=False, lib=lib)
        with pytest.raises(SgexError, match="no frames to write"):
            write_video(tmp_path / "o.mp4", iter([]), 10.0, progress=False, lib=lib)
        with pytest.raises(SgexError, match="differs from the first frame"):
            with VideoWriter(tmp_path / "o.mp4", 10.0, lib=lib) as vw:
                vw.write(np.zeros((32, 32, 3), np.uint8))
                vw.write(np.zeros((32, 64, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs mounted for the test (needs root and mount; skips elsewhere): a real
    ENOSPC from the kernel, not a mock."""
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.parametrize("lib", ["av", "opencv"])
def test_disk_full_is_an_error_and_keeps_the_existing_output(tmp_path, small_disk, lib):
    src = make_clip(tmp_path / "in.mp4", frames=12, audio_s=1.0)
    out = small_disk / "out.mp4"
    old = np.random.default_rng(1).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    out.write_bytes(old)  # the previous result fills 40% of the disk
    rng = np.random.default_rng(0)

    def noise(frames):  # incompressible 256x192 frames: about 100 KB each at crf 18
        for f in frames:
            yield rng.integers(0, 256, (f.shape[0] * 4, f.shape[1] * 4, 3), dtype=np.uint8)

    reader = VideoReader(src, lib=lib)
    with pytest.raises(SgexError, match="No space left on device|holds [0-9]+ of 12 frames") as ei:
        run_video(reader, out, noise, encoding=resolve_encoding(out, lib), progress=False)
    # PyAV reports the ENOSPC; OpenCV's writer swallows it and the re-count of the temp file catches it
    assert ("No space left" in str(ei.value)) == (lib == "av")
    assert out.read_bytes() == old
    assert listing(small_disk) == ["out.mp4"]


# -- reading ---------------------------------------------------------------------------------------

def test_reader_info_and_frames(tmp_path):
    for lib in ("av", "opencv"):
        r = VideoReader(cv_mp4(tmp_path / "in.mp4"), lib=lib)
        assert (r.info.frames, r.info.fps, r.info.width, r.info.height, r.info.lib) == (5, 12.0, 40, 32, lib)
        frames = list(r)
        assert len(frames) == 5 and frames[0].shape == (32, 40, 3) and frames[0].dtype == np.uint8
        assert abs(int(frames[3].mean()) - 120) <= 3  # decoded levels survive mp4v


def test_rotation_metadata_is_applied_as_opencv_does(tmp_path):
    """A clip whose display matrix turns it 90 degrees counter-clockwise (written with PyAV's
    set_display_rotation) decodes turned, on PyAV as on OpenCV (CAP_PROP_ORIENTATION_AUTO)."""
    src = tmp_path / "rot.mp4"
    c = av.open(str(src), "w")
    s = c.add_stream("libx264", rate=10, options={"crf": "0"})
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    s.set_display_rotation(90)
    for i in range(2):
        for p in s.encode(av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    r = VideoReader(src)
    assert r.info.rotation == 90 and (r.info.width, r.info.height) == (48, 64)
    frames = list(r)
    assert np.array_equal(frames[1], np.rot90(index_frame(1), 1))
    cv = list(VideoReader(src, lib="opencv"))
    assert cv[1].shape == (64, 48, 3) and np.abs(cv[1].astype(int) - frames[1]).max() <= 8
    out = tmp_path / "out.mp4"
    run_video(VideoReader(src), out, process(), progress=False)
    with av.open(str(out)) as o:
        f = next(o.decode(video=0))
        assert (f.width, f.height) == (192, 256) and not f.rotation  # upright, no rotation left


@pytest.mark.parametrize("case", ["zero_frames", "empty", "junk", "missing"])
def test_bad_videos(tmp_path, case):
    p = tmp_path / "v.mp4"
    if case == "zero_frames":
        cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"mp4v"), 10, (32, 32)).release()
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "junk":
        p.write_bytes(b"not a video" * 50)
    word = {"zero_frames": "no frames|no video stream|cannot decode|can decode", "empty": "empty file", "junk": "decode",
            "missing": "no such file"}[case]
    for lib in ("av", "opencv"):
        with pytest.raises(SgexError, match=word):
            VideoReader(p, lib=lib)


def test_count_frames_of_a_written_file(tmp_path):
    src = make_clip(tmp_path / "in.mp4", frames=7)
    assert count_frames(src, "av") == count_frames(src, "opencv") == 7
    (tmp_path / "junk.mp4").write_bytes(b"junk" * 100)
    assert count_frames(tmp_path / "junk.mp4", "av") == count_frames(tmp_path / "junk.mp4", "opencv") == 0


def test_progress_shows_rate_and_eta():
    buf = io.StringIO()
    bar = Progress(4, force=True, interval=0.0, stream=buf)
    bar.update()
    assert "frames 1/4  25%" in buf.getvalue() and "fps ETA 0:00:0" in buf.getvalue()
    for _ in range(3):
        bar.update()
    bar.close()
    assert "frames 4/4 100%" in buf.getvalue() and buf.getvalue().endswith("\n")


def test_writer_without_source_uses_fps_as_time_base(tmp_path):
    out = tmp_path / "o.mp4"
    with VideoWriter(out, 25.0, lib="av") as vw:
        for i in range(3):
            vw.write(index_frame(i))
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert s.average_rate == 25 and s.frames == 3
        # the MP4 muxer refines a coarse time base (1/25 -> 1/12800); the times stay exact
        assert [f.pts * f.time_base for f in c.decode(s)] == [Fraction(i, 25) for i in range(3)]

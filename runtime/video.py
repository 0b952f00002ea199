"""Video decode and encode, and the pipeline decode thread -> engine -> encode thread.

Two libraries, chosen once per run (`resolve_lib`; "auto" prefers PyAV and says when it cannot):

  PyAV (`av`, extra `video`): decodes any container FFmpeg reads. Writes H.264 (libx264; when the
      wheel's FFmpeg lacks it, the best encoder it has, logged) as yuv420p in MP4/MOV/MKV/AVI (VP9
      in WebM), CRF `DEFAULT_CRF` unless told. Every frame keeps its source timestamp, so fps and
      the time base are those of the source (Matroska always stores 1/1000). The source's audio
      streams are copied packet by packet (remux, no re-encode), cut after the last packet that
      starts before the end of the last written frame. Rotation metadata (the display matrix) is
      APPLIED: frames are turned upright before the engine sees them and the output carries no
      rotation.
  OpenCV (base install): mp4v / MJPG / VP8 at constant fps, no audio (said once per run),
      rotation as OpenCV applies it (CAP_PROP_ORIENTATION_AUTO, on by default).

Frame exactness: output frame i is made from input frame i. A frame the decoder cannot decode is
an error (SgexError naming the frame), and a clip that decodes to fewer frames than its container
declares is an error too, never a silently shorter output.

Writing: a temp file beside the output (runtime.io.atomic_output), re-opened and its frames
counted before the rename; any error, interruption or disk full removes it and leaves an existing
output untouched. OSError while writing becomes one SgexError line.

Memory: frames flow through bounded queues (`run_video`), so it does not depend on the clip's
length. Frames are uint8 RGB [H, W, 3] on the Python side.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from runtime.errors import MissingDependency, SgexError
from runtime.io import atomic_output, check_input_file

log = logging.getLogger(__name__)

LIBS = ("auto", "av", "opencv")
DEFAULT_CRF = 18  # x264's scale: 0 lossless, 23 its own default, 18 about visually lossless
H264 = ("libx264", "libopenh264", "mpeg4")  # best first; the wheel's FFmpeg decides which exist
# PyAV writer: output extension -> (FFmpeg muxer, video encoders best first)
AV_CONTAINERS = {".mp4": ("mp4", H264), ".m4v": ("mp4", H264), ".mov": ("mov", H264),
                 ".mkv": ("matroska", H264), ".avi": ("avi", H264), ".webm": ("webm", ("libvpx-vp9", "libvpx"))}
CRF_MAX = {"libx264": 51, "libx265": 51, "libvpx-vp9": 63, "libvpx": 63, "libsvtav1": 63}
# OpenCV writer: output extension -> fourcc. mp4v (MPEG-4 part 2) is the official video_editing.py
# codec and is in every OpenCV FFmpeg build; MJPG for AVI; VP8 for WebM.
FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG", ".webm": "VP80"}
# containers that store their frame count (OpenCV reads it; elsewhere it estimates from the duration)
_COUNTED = (".mp4", ".m4v", ".mov", ".avi")

__all__ = ["LIBS", "DEFAULT_CRF", "FOURCC", "AV_CONTAINERS", "VideoInfo", "Encoding", "resolve_lib",
           "resolve_encoding", "VideoReader", "VideoWriter", "Progress", "write_video", "run_video",
           "count_frames", "write_test_clip"]


def _cv2():
    import cv2

    return cv2


def _av():
    import av

    return av


def resolve_lib(lib: str = "auto") -> str:
    """"av" or "opencv". "auto": PyAV when it imports, else OpenCV with one warning that the audio
    is dropped. "av" without PyAV raises MissingDependency."""
    if lib not in LIBS:
        raise SgexError(f"video library must be one of {', '.join(LIBS)}, got {lib!r}")
    if lib == "opencv":
        return lib
    try:
        _av()
    except ImportError:
        if lib == "av":
            raise MissingDependency("PyAV (H.264 video with audio)", "video") from None
        log.warning("PyAV is not installed (pip install -c constraints.txt 'sgex[video]'): video goes "
                    "through OpenCV (mp4v, constant fps) and the audio is dropped")
        return "opencv"
    return "av"


@dataclass(frozen=True)
class VideoInfo:
    path: str
    frames: int  # the container's frame count (0 when it does not say); decoding is the truth
    fps: float
    width: int   # of the decoded frames (after rotation, when it is applied)
    height: int
    lib: str = "opencv"
    rate: Fraction | None = None       # PyAV: the stream's average frame rate, exactly
    time_base: Fraction | None = None  # PyAV: the video stream's time base
    codec: str | None = None
    rotation: int = 0                  # degrees counter-clockwise the display matrix turns frames
    audio: tuple = field(default=())   # PyAV: indices of the source's audio streams


@dataclass(frozen=True)
class Encoding:
    """How a video output is written (resolve_encoding): library, container, encoder, CRF."""

    lib: str
    format: str | None = None  # FFmpeg muxer (PyAV)
    codec: str | None = None   # FFmpeg encoder (PyAV) or fourcc (OpenCV)
    crf: int | None = None

    def describe(self) -> str:
        if self.lib == "opencv":
            return f"OpenCV {self.codec}, no audio"
        return f"PyAV {self.codec}" + (f" crf {self.crf}" if self.crf is not None else "") + f" in {self.format}"


def _encoder_ok(name: str) -> bool:
    av = _av()
    try:
        return av.Codec(name, "w").type == "video"
    except (av.error.FFmpegError, ValueError):
        return False


def resolve_encoding(path: str | os.PathLike, lib: str, *, codec: str | None = None,
                     crf: int | None = None, source: VideoInfo | None = None) -> Encoding:
    """Check the output settings before any work: the extension, the encoder (`codec`, or the best
    one of the container's list, logged when it is not the first), the CRF, and that the source's
    audio codecs fit the container. SgexError (one line) otherwise."""
    ext = Path(path).suffix.lower()
    if lib == "opencv":
        if codec is not None or crf is not None:
            raise MissingDependency("PyAV (needed by --codec/--crf)", "video")
        if ext not in FOURCC:
            raise SgexError(f"{path}: cannot write {ext!r} video (choose from: {', '.join(FOURCC)})")
        return Encoding("opencv", codec=FOURCC[ext])
    if ext not in AV_CONTAINERS:
        raise SgexError(f"{path}: cannot write {ext!r} video (choose from: {', '.join(AV_CONTAINERS)})")
    fmt, ladder = AV_CONTAINERS[ext]
    if codec is not None:
        if not _encoder_ok(codec):
            raise SgexError(f"--codec {codec}: not a video encoder of this FFmpeg build (PyAV {_av().__version__})")
        chosen = codec
    else:
        have = [c for c in ladder if _encoder_ok(c)]
        if not have:
            raise SgexError(f"{path}: this FFmpeg build has none of the encoders {', '.join(ladder)} for {ext}")
        chosen = have[0]
        if chosen != ladder[0]:
            log.warning("%s is not in this FFmpeg build: encoding %s with %s", ladder[0], ext, chosen)
    if crf is not None:
        if chosen not in CRF_MAX:
            raise SgexError(f"--crf applies to {', '.join(CRF_MAX)}, not {chosen}")
        if not 0 <= crf <= CRF_MAX[chosen]:
            raise SgexError(f"--crf must be 0..{CRF_MAX[chosen]} for {chosen}, got {crf}")
    elif chosen in CRF_MAX:
        crf = DEFAULT_CRF
    out = _av().open(io.BytesIO(), "w", format=fmt)
    try:
        supported = out.supported_codecs
    finally:
        out.close()
    if chosen not in supported:
        raise SgexError(f"{path}: the {fmt} container cannot hold {chosen} video")
    if source is not None and source.audio:
        src = _av().open(source.path)
        try:
            for i in source.audio:
                name = src.streams[i].codec_context.name
                if name not in supported:
                    raise SgexError(f"{path}: the source's {name} audio cannot be copied into {ext}; "
                                    f"write .mkv instead")
        finally:
            src.close()
    return Encoding("av", fmt, chosen, crf)


# -- reading --------------------------------------------------------------------------------------

class _AvSource:
    """PyAV decoder: (pts, uint8 RGB frame) in presentation order, rotation applied."""

    def __init__(self, p: Path):
        av = _av()
        self.path = p
        try:
            self._c = av.open(str(p), "r", metadata_errors="ignore")
        except (av.error.FFmpegError, UnicodeDecodeError) as e:
            raise SgexError(f"{p}: not a video FFmpeg can decode ({getattr(e, 'strerror', None) or e})") from None
        if not self._c.streams.video:
            self._c.close()
            raise SgexError(f"{p}: the file has no video stream")
        s = self._c.streams.video[0]
        s.thread_type = "AUTO"
        rate = s.average_rate or s.guessed_rate or s.base_rate
        if not rate or rate <= 0:
            self._c.close()
            raise SgexError(f"{p}: the video has no frame rate")
        self.stream = s
        self.declared = int(s.frames or 0)
        self.rate, self.time_base = Fraction(rate), s.time_base
        self.audio = tuple(a.index for a in self._c.streams.audio)
        self.rotation = 0

    def frames(self) -> Iterator[tuple[int | None, np.ndarray]]:
        av = _av()
        n = 0
        try:
            for packet in self._c.demux(self.stream):
                for f in packet.decode():
                    img = f.to_ndarray(format="rgb24")
                    rotation = int(f.rotation or 0)  # degrees counter-clockwise, as np.rot90's k * 90
                    k = round(rotation / 90) % 4
                    if n == 0 and k:
                        self.rotation = rotation
                        log.info("%s: rotation metadata %d degrees applied (frames turned upright)",
                                 self.path, self.rotation)
                    yield f.pts, np.ascontiguousarray(np.rot90(img, k)) if k else img
                    n += 1
        except av.error.FFmpegError as e:
            raise SgexError(f"{self.path}: frame {n} cannot be decoded "
                            f"({getattr(e, 'strerror', None) or e}); nothing is written") from None
        _check_count(self.path, n, self.declared, strict=True)

    def close(self) -> None:
        self._c.close()


class _CvSource:
    """OpenCV decoder: (None, uint8 RGB frame); timestamps are the frame index at constant fps."""

    def __init__(self, p: Path):
        cv2 = _cv2()
        self.path = p
        self._cap = cv2.VideoCapture(str(p))
        if not self._cap.isOpened():
            raise SgexError(f"{p}: not a video OpenCV can decode")
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not fps > 0:
            self._cap.release()
            raise SgexError(f"{p}: the video has no frame rate")
        self.fps = fps
        self.declared = max(0, int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT)))
        self.rate = self.time_base = None
        self.audio, self.rotation = (), 0

    def frames(self) -> Iterator[tuple[None, np.ndarray]]:
        cv2 = _cv2()
        n = 0
        while True:
            ok, frame = self._cap.read()
            if not ok:
                break
            yield None, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            n += 1
        _check_count(self.path, n, self.declared, strict=self.path.suffix.lower() in _COUNTED)

    def close(self) -> None:
        self._cap.release()


def _check_count(path: Path, decoded: int, declared: int, *, strict: bool) -> None:
    if declared and decoded < declared:
        msg = (f"{path}: decoded {decoded} of the {declared} frames the container declares "
               f"(damaged or truncated video)")
        if strict:
            raise SgexError(msg + "; nothing is written")
        log.warning("%s (the count of this container is an estimate)", msg)


class VideoReader:
    """Open a video and decode its first frame (SgexError when it cannot be opened or has no
    frames). `timed()` yields (pts or None, frame) for every frame, the first included; iterating
    yields the frames, uint8 RGB [H, W, 3]. Read once. `lib`: "auto" | "av" | "opencv"."""

    def __init__(self, path: str | os.PathLike, *, lib: str = "auto"):
        p = check_input_file(path, "a video")
        self.path = p
        self.lib = resolve_lib(lib)
        self._src = _AvSource(p) if self.lib == "av" else _CvSource(p)
        self._gen = self._src.frames()
        try:
            first = next(self._gen, None)
        except BaseException:
            self.close()
            raise
        if first is None:
            self.close()
            raise SgexError(f"{p}: the video has no frames")
        frame = first[1]
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            self.close()
            raise SgexError(f"{p}: frames are {frame.dtype} {list(frame.shape)}, not 8-bit colour")
        s = self._src
        fps = float(s.rate) if self.lib == "av" else s.fps
        codec = s.stream.codec_context.name if self.lib == "av" else None
        self.info = VideoInfo(str(p), s.declared, fps, frame.shape[1], frame.shape[0], self.lib, s.rate,
                              s.time_base, codec, s.rotation, s.audio)
        self._first: tuple | None = first

    @property
    def first(self) -> np.ndarray:
        if self._first is None:
            raise SgexError(f"{self.path}: the reader was already read")
        return self._first[1]

    def timed(self) -> Iterator[tuple[int | None, np.ndarray]]:
        if self._first is None:
            raise SgexError(f"{self.path}: a VideoReader is read once")
        first, self._first = self._first, None
        try:
            yield first
            yield from self._gen
        finally:
            self.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        for _, frame in self.timed():
            yield frame

    def check_complete(self) -> None:
        """Before any work (PyAV): demux the whole file, without decoding, and raise SgexError when
        it holds fewer video packets than the frames its container declares (damaged or truncated;
        decoding checks the same again, frame by frame). Reads the file once more; OpenCV: no-op."""
        if self.lib != "av" or not self.info.frames:
            return
        n = count_frames(self.path, "av")
        if n < self.info.frames:
            raise SgexError(f"{self.path}: holds {n} of the {self.info.frames} frames the container declares "
                            f"(damaged or truncated video); nothing is written")

    def close(self) -> None:
        self._gen.close()
        self._src.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# -- writing --------------------------------------------------------------------------------------

def count_frames(path: str | os.PathLike, lib: str) -> int:
    """Frames in a written file: PyAV counts the video packets (no decoding; one per frame for
    every encoder sgex writes), OpenCV grabs (decodes) every frame. 0 when it does not open."""
    if lib == "av":
        av = _av()
        try:
            with av.open(str(path)) as c:
                return sum(1 for p in c.demux(c.streams.video[0]) if p.size)
        except (av.error.FFmpegError, IndexError):
            return 0
    cap = _cv2().VideoCapture(str(path))
    n = 0
    while cap.isOpened() and cap.grab():
        n += 1
    cap.release()
    return n


class _AudioCopy:
    """The source's audio packets, remuxed untouched into `out` in step with the video."""

    def __init__(self, src: str, indices: tuple, out):
        self._in = _av().open(src)
        ins = [self._in.streams[i] for i in indices]
        self._outs = {s.index: out.add_stream_from_template(s) for s in ins}
        self._out = out
        self._packets = self._in.demux(*ins)
        self._pending = None
        self.copied = 0

    def mux_until(self, t: float) -> None:
        """Mux every packet that starts before t seconds."""
        while True:
            p, self._pending = self._pending or next(self._packets, None), None
            if p is None:
                return
            ts = p.pts if p.pts is not None else p.dts
            if ts is None:  # the demuxer's end-of-stream marker
                continue
            if float(ts * p.time_base) >= t:
                self._pending = p
                return
            p.stream = self._outs[p.stream.index]
            self._out.mux(p)
            self.copied += 1

    def close(self) -> None:
        self._in.close()


class VideoWriter:
    """Context manager: frames uint8 RGB [H, W, 3] of one size -> `path`, via a temp file that is
    re-opened and its frames counted before the rename (removed on any error). The size is taken
    from the first frame. `source` (a VideoInfo from PyAV) gives the time base and the audio
    streams to copy; `write(frame, pts)` takes the source timestamp (None: frame index at fps)."""

    def __init__(self, path: str | os.PathLike, fps: float, *, lib: str = "auto",
                 encoding: Encoding | None = None, source: VideoInfo | None = None):
        self.path = Path(path)
        self.encoding = encoding or resolve_encoding(self.path, resolve_lib(lib), source=source)
        self.lib = self.encoding.lib
        self.fps = float(fps)
        self.source = source
        self.frames = 0
        self.size: tuple[int, int] | None = None
        self._atomic = atomic_output(self.path)
        self._tmp: Path | None = None
        self._vw = self._c = self._s = self._audio = None
        self._last_pts: int | None = None
        self._end = 0.0  # seconds: end of the last written frame

    @property
    def fourcc(self) -> str | None:
        return self.encoding.codec if self.lib == "opencv" else None

    def __enter__(self) -> "VideoWriter":
        self._tmp = self._atomic.__enter__()
        return self

    def _failed(self, e: OSError) -> SgexError:
        kept = "; the existing file is unchanged" if self.path.exists() else ""
        return SgexError(f"{self.path}: writing failed ({e.strerror or e}){kept}")

    def write(self, frame: np.ndarray, pts: int | None = None) -> None:
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            got = f"{frame.dtype} {list(frame.shape)}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise SgexError(f"frame {self.frames}: expected uint8 [H, W, 3], got {got}")
        h, w = frame.shape[:2]
        try:
            if self.size is None:
                self._open(w, h)
            elif (w, h) != self.size:
                raise SgexError(f"frame {self.frames}: size {w}x{h} differs from the first frame "
                                f"{self.size[0]}x{self.size[1]}")
            if self.lib == "av":
                self._write_av(frame, pts)
            else:
                self._vw.write(_cv2().cvtColor(frame, _cv2().COLOR_RGB2BGR))
        except OSError as e:
            raise self._failed(e) from None
        self.frames += 1

    def _open(self, w: int, h: int) -> None:
        self.size = (w, h)
        enc = self.encoding
        if self.lib == "opencv":
            cv2 = _cv2()
            self._vw = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*enc.codec), self.fps, (w, h))
            if not self._vw.isOpened():
                raise SgexError(f"{self.path}: OpenCV cannot open a {enc.codec} writer for {w}x{h}")
            return
        if w % 2 or h % 2:
            raise SgexError(f"{self.path}: yuv420p needs even sides, got {w}x{h}")
        av = _av()
        src = self.source if self.source is not None and self.source.lib == "av" else None
        rate = src.rate if src is not None else Fraction(self.fps).limit_denominator(1001)
        self._tb = src.time_base if src is not None else 1 / rate
        self._step = max(1, round(1 / (rate * self._tb)))
        self._c = av.open(str(self._tmp), "w", format=enc.format)
        opts = {"crf": str(enc.crf)} if enc.crf is not None else {}
        self._s = self._c.add_stream(enc.codec, rate=rate, options=opts)
        self._s.width, self._s.height = w, h
        formats = [f.name for f in (self._s.codec_context.codec.video_formats or ())]
        self._s.pix_fmt = "yuv420p" if not formats or "yuv420p" in formats else formats[0]
        self._s.time_base = self._tb
        if src is not None and src.audio:
            self._audio = _AudioCopy(src.path, src.audio, self._c)

    def _write_av(self, frame: np.ndarray, pts: int | None) -> None:
        av = _av()
        if pts is None or (self._last_pts is not None and pts <= self._last_pts):
            pts = 0 if self._last_pts is None else self._last_pts + self._step
        self._last_pts = pts
        vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
        vf.pts, vf.time_base = pts, self._tb
        self._end = float((pts + self._step) * self._tb)
        self._mux(self._s.encode(vf))

    def _mux(self, packets) -> None:
        for p in packets:
            if self._audio is not None and p.dts is not None:
                self._audio.mux_until(float(p.dts * p.time_base))
            self._c.mux(p)

    def _finish(self) -> None:
        """Flush the encoder, copy the audio up to the end of the last frame, close the file."""
        if self.lib == "opencv":
            self._vw.release()
            self._vw = None
            return
        self._mux(self._s.encode())
        if self._audio is not None:
            self._audio.mux_until(self._end)
            log.debug("%s: copied %d audio packets (cut at %.3f s)", self.path, self._audio.copied, self._end)
        self._c.close()
        self._c = None

    def _commit(self) -> None:
        if self.frames == 0:
            raise SgexError(f"{self.path}: no frames to write")
        try:
            self._finish()
        except OSError as e:
            raise self._failed(e) from None
        got = count_frames(self._tmp, self.lib)
        if got != self.frames:
            raise SgexError(f"{self.path}: the written file holds {got} of {self.frames} frames "
                            f"(disk full or an encoder error?); nothing is written")

    def _abort(self) -> None:
        """Close whatever is open, ignoring its errors: the temp file is removed next."""
        for closer in (getattr(self._vw, "release", None), getattr(self._c, "close", None),
                       getattr(self._audio, "close", None)):
            if closer is not None:
                try:
                    closer()
                except Exception:  # noqa: BLE001 - a broken half-written file; it is deleted anyway
                    pass
        self._vw = self._c = self._audio = None

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self._commit()
            except BaseException as e:
                self._abort()
                self._atomic.__exit__(type(e), e, e.__traceback__)
                raise
            self._abort()  # only the audio source is still open
            return self._atomic.__exit__(None, None, None)
        self._abort()
        return self._atomic.__exit__(exc_type, exc, tb)


def write_test_clip(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: int, *, crf: int = 18,
                    tone_s: float | None = None) -> int:
    """A synthetic clip for tests and benchmarks, written with PyAV: `frames` (uint8 RGB, one
    size, even sides) as H.264 yuv420p at `crf` and `fps`, plus, with `tone_s`, an AAC 440 Hz
    mono tone of that many seconds on a second stream. Returns the frame count."""
    av = _av()
    sr, n = 44100, 0
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=fps, options={"crf": str(crf)})
        a = None
        if tone_s:
            a = c.add_stream("aac", rate=sr)
            a.layout = "mono"
        for img in frames:
            if n == 0:
                vs.width, vs.height, vs.pix_fmt = img.shape[1], img.shape[0], "yuv420p"
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
            n += 1
        for p in vs.encode():
            c.mux(p)
        if a is not None:
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(sr * tone_s)) / sr)).astype(np.float32)
            for k in range(0, len(tone), 1024):
                af = av.AudioFrame.from_ndarray(tone[None, k:k + 1024], format="fltp", layout="mono")
                af.sample_rate, af.pts = sr, k
                for p in a.encode(af):
                    c.mux(p)
            for p in a.encode():
                c.mux(p)
    return n


# -- progress -------------------------------------------------------------------------------------

class Progress:
    """A one-line counter on stderr with rate and ETA, redrawn at most every `interval` seconds;
    only when stderr is a terminal unless `force`. total 0 = unknown. Thread-safe updates."""

    def __init__(self, total: int, label: str = "frames", *, force: bool = False, interval: float = 0.25,
                 stream=None, unit: str | None = None):
        self.total, self.label, self.n = total, label, 0
        self.unit = unit or ("fps" if label == "frames" else "/s")
        self.stream = stream or sys.stderr
        self.enabled = force or self.stream.isatty()
        self.interval = interval
        self._t0 = self._last = time.perf_counter()
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
            now = time.perf_counter()
            if self.enabled and now - self._last >= self.interval:
                self._last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.n / max(now - self._t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        pct = f" {100 * self.n / self.total:3.0f}%" if self.total else ""
        eta = ""
        if self.total and rate > 0 and self.n < self.total:
            s = int(round((self.total - self.n) / rate))
            eta = f" ETA {s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
        self.stream.write(f"\r{self.label} {self.n}{of}{pct} {rate:.2f} {self.unit}{eta}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float, *,
                total: int = 0, progress: bool = True, lib: str = "auto") -> int:
    """Stream `frames` into `path` (atomically, no audio); returns the number of frames written."""
    bar = Progress(total) if progress else None
    try:
        with VideoWriter(path, fps, lib=lib) as vw:
            for frame in frames:
                vw.write(frame)
                if bar:
                    bar.update()
    finally:
        if bar:
            bar.close()
    return vw.frames


# -- the pipeline ---------------------------------------------------------------------------------

class _Stopped(BaseException):
    """Raised in a stage when another stage failed or the run was interrupted (BaseException, so
    no `except Exception` on the way can swallow it)."""


_END = object()
_POLL = 0.05  # seconds a blocked stage waits before checking the stop flag


@dataclass
class _Failed:
    exc: BaseException


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=_POLL)
            return
        except queue.Full:
            pass


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            return q.get(timeout=_POLL)
        except queue.Empty:
            pass


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        while t.is_alive():  # join with a timeout stays interruptible by Ctrl-C
            t.join(_POLL)


Process = Callable[[Iterator[np.ndarray]], Iterable[np.ndarray]]


def run_video(reader: VideoReader, output: str | os.PathLike, process: Process, *,
              encoding: Encoding | None = None, prep: Callable[[np.ndarray], np.ndarray] | None = None,
              pipelined: bool = True, queue_frames: int = 8, progress: bool = True) -> int:
    """Decode `reader`, run `process` (an iterator of input frames -> their outputs, one per input,
    in order: e.g. `lambda fr: engine.process_video(fr, batch_size=N)`), encode into `output` with
    the source's timestamps and audio. Returns the number of frames written.

    pipelined: a decode thread and an encode thread around the calling thread, which runs
    `process`, joined by bounded queues of `queue_frames` frames each; else one thread, stage after
    stage per frame (the serial baseline). On any error or interruption every stage stops, the
    threads are joined, the temp output is removed and the error is raised in the calling thread."""
    prep = prep or (lambda im: im)
    pts_fifo: collections.deque = collections.deque()  # source pts of frames decoded, not yet written
    bar = Progress(reader.info.frames) if progress else None
    writer = VideoWriter(output, reader.info.fps, encoding=encoding, lib=reader.lib, source=reader.info)
    try:
        with writer:
            if pipelined:
                _pipelined(reader, writer, process, prep, pts_fifo, bar, max(1, queue_frames))
            else:
                def frames():
                    for pts, img in reader.timed():
                        pts_fifo.append(pts)
                        yield prep(img)

                for out in process(frames()):
                    writer.write(out, pts_fifo.popleft())
                    if bar:
                        bar.update()
            if writer.frames == 0 or pts_fifo:
                raise SgexError(f"{output}: {writer.frames} frames written for "
                                f"{writer.frames + len(pts_fifo)} decoded; nothing is written")
    finally:
        if bar:
            bar.close()
    return writer.frames


def _pipelined(reader, writer, process, prep, pts_fifo, bar, size: int) -> None:
    stop = threading.Event()
    dq: queue.Queue = queue.Queue(size)
    eq: queue.Queue = queue.Queue(size)
    enc_error: list[BaseException] = []

    def decode():
        gen = reader.timed()
        try:
            for pts, img in gen:
                img = prep(img)
                pts_fifo.append(pts)
                _put(dq, img, stop)
            _put(dq, _END, stop)
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread, which raises it
            try:
                _put(dq, _Failed(e), stop)
            except _Stopped:
                pass
        finally:
            gen.close()

    def encode():
        try:
            while True:
                item = _get(eq, stop)
                if item is _END:
                    return
                writer.write(item, pts_fifo.popleft())
                if bar:
                    bar.update()
        except _Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread, which raises it
            enc_error.append(e)
            stop.set()

    def frames():
        while True:
            item = _get(dq, stop)
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    threads = [threading.Thread(target=decode, name="sgex-decode", daemon=True),
               threading.Thread(target=encode, name="sgex-encode", daemon=True)]
    for t in threads:
        t.start()
    try:
        try:
            for out in process(frames()):
                _put(eq, out, stop)
            _put(eq, _END, stop)
            _join(threads[1:])
        except _Stopped:
            pass
        if enc_error:
            raise enc_error[0]
    finally:
        stop.set()
        _join(threads)

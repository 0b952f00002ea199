"""Video decode/encode with OpenCV, streamed: one frame in memory at a time (plus the engine's
batch), so a clip of any length runs in bounded memory.

The output keeps the source's frame count and fps; it is written to a temp name in the output's
directory and renamed only when every frame is written, so a failed or interrupted run leaves no
output file. Frames are uint8 RGB [H, W, 3] on the Python side (OpenCV's BGR stays in here).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from runtime.errors import SgexError
from runtime.io import atomic_output, check_input_file

# Output container -> codec. mp4v (MPEG-4 part 2) is the official video_editing.py codec and is
# in every OpenCV FFmpeg build; MJPG for AVI; VP8 for WebM.
FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG", ".webm": "VP80"}

__all__ = ["FOURCC", "VideoInfo", "VideoReader", "VideoWriter", "Progress", "write_video"]


def _cv2():
    import cv2

    return cv2


@dataclass(frozen=True)
class VideoInfo:
    path: str
    frames: int  # the container's frame count (0 when it does not say); decoding is the truth
    fps: float
    width: int
    height: int


class VideoReader:
    """Open a video and decode its first frame (SgexError when it cannot be opened or has no
    frames); iterating yields every frame, the first included, as uint8 RGB [H, W, 3]."""

    def __init__(self, path: str | os.PathLike):
        cv2 = _cv2()
        p = check_input_file(path, "a video")
        self.path = p
        self._cap = cv2.VideoCapture(str(p))
        if not self._cap.isOpened():
            raise SgexError(f"{p}: not a video OpenCV can decode")
        ok, frame = self._cap.read()
        if not ok or frame is None:
            self._cap.release()
            raise SgexError(f"{p}: the video has no frames")
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            self._cap.release()
            raise SgexError(f"{p}: frames are {frame.dtype} {list(frame.shape)}, not 8-bit colour")
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not fps > 0:
            self._cap.release()
            raise SgexError(f"{p}: the video has no frame rate")
        self.info = VideoInfo(str(p), max(0, int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))), fps,
                              frame.shape[1], frame.shape[0])
        self._first = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    @property
    def first(self) -> np.ndarray:
        return self._first

    def __iter__(self) -> Iterator[np.ndarray]:
        cv2 = _cv2()
        if self._first is None:
            raise SgexError(f"{self.path}: a VideoReader is read once")
        first, self._first = self._first, None
        try:
            yield first
            while True:
                ok, frame = self._cap.read()
                if not ok:
                    break
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        finally:
            self.close()

    def close(self) -> None:
        self._cap.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class VideoWriter:
    """Context manager: frames uint8 RGB [H, W, 3] of one size -> `path`, via a temp file renamed
    on success (removed on error). The size is taken from the first frame."""

    def __init__(self, path: str | os.PathLike, fps: float):
        self.path = Path(path)
        ext = self.path.suffix.lower()
        if ext not in FOURCC:
            raise SgexError(f"{self.path}: cannot write {ext!r} video (choose from: {', '.join(FOURCC)})")
        self.fourcc = FOURCC[ext]
        self.fps = float(fps)
        self.frames = 0
        self.size: tuple[int, int] | None = None
        self._atomic = atomic_output(self.path)
        self._tmp: Path | None = None
        self._vw = None

    def __enter__(self) -> "VideoWriter":
        self._tmp = self._atomic.__enter__()
        return self

    def write(self, frame: np.ndarray) -> None:
        cv2 = _cv2()
        h, w = frame.shape[:2]
        if self._vw is None:
            self._vw = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*self.fourcc), self.fps, (w, h))
            if not self._vw.isOpened():
                raise SgexError(f"{self.path}: OpenCV cannot open a {self.fourcc} writer for {w}x{h}")
            self.size = (w, h)
        elif (w, h) != self.size:
            raise SgexError(f"frame {self.frames}: size {w}x{h} differs from the first frame {self.size[0]}x{self.size[1]}")
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise SgexError(f"frame {self.frames}: expected uint8 [H, W, 3], got {frame.dtype} {list(frame.shape)}")
        self._vw.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def __exit__(self, exc_type, exc, tb):
        if self._vw is not None:
            self._vw.release()
        if exc_type is None and self.frames == 0:
            self._atomic.__exit__(SgexError, None, None)
            raise SgexError(f"{self.path}: no frames to write")
        return self._atomic.__exit__(exc_type, exc, tb)


class Progress:
    """A one-line frame counter on stderr, redrawn at most every `interval` seconds; only when
    stderr is a terminal unless `force`. total 0 = unknown."""

    def __init__(self, total: int, label: str = "frames", *, force: bool = False, interval: float = 0.25,
                 stream=None):
        self.total, self.label, self.n = total, label, 0
        self.stream = stream or sys.stderr
        self.enabled = force or self.stream.isatty()
        self.interval = interval
        self._t0 = self._last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.n / max(now - self._t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        pct = f" {100 * self.n / self.total:3.0f}%" if self.total else ""
        self.stream.write(f"\r{self.label} {self.n}{of}{pct} {rate:.2f}/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float, *,
                total: int = 0, progress: bool = True) -> int:
    """Stream `frames` into `path` (atomically); returns the number of frames written."""
    bar = Progress(total) if progress else None
    try:
        with VideoWriter(path, fps) as vw:
            for frame in frames:
                vw.write(frame)
                if bar:
                    bar.update()
    finally:
        if bar:
            bar.close()
    return vw.frames

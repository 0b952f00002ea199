"""The photo/video face pipeline around `Engine`: the official input recipes (runtime/recipes.py,
steps in runtime/faces.py), then sgex's additions (every face batched by crop size, paste-back,
tracking). `Engine.process_photo` and `Engine.process_video(faces=...)` call into here.

    opts = FaceOptions(faces="all", paste_back=True)
    res = eng.process_photo(rgb, opts)        # PhotoResult: .image, .faces[i].output, .timings

Order of work for one image (spec 4.0 / 4.1):
  1. superres only: PIL-resize the input by S/4 (bicubic), as image_translation.py --use_raw_data;
  2. detect (or take the user's landmarks, scaled by the same resize), rank best first, select;
  3. per face: crop_params, crop (x1), re-detect in the crop and align (x2);
  4. one style call for every x2, then one synth call per distinct x1 size (faces of one size are
     one batch; the engine splits it into chunks of the bucket's max batch);
  5. paste-back (optional): the frame at the best face's output scale, every face blended in.

Timings (seconds) of every stage are returned, so sgex-bench can report them beside the model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from runtime import faces as F
from runtime.errors import SgexError
from runtime.recipes import Recipe, get_recipe, pre_resize_size

log = logging.getLogger(__name__)

__all__ = ["FaceOptions", "FaceJob", "FaceOutput", "PhotoResult", "parse_faces", "read_landmarks",
           "find_faces", "prepare", "run_jobs", "compose", "process_photo", "process_video"]

STAGES = ("detect", "crop_align", "model", "paste_back")


def parse_faces(value: str | int) -> str | int:
    """--faces: "best", "all" or a count N >= 1."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        n = int(value)
        if n < 1:
            raise SgexError(f"--faces must be best, all or a count >= 1, got {value}")
        return n
    if value not in ("best", "all"):
        raise SgexError(f"--faces must be best, all or a count >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class FaceOptions:
    """faces: "best" | "all" | N (the N best); paste_back: the whole frame out; track (video):
    follow the face (faces.CropTracker); landmarks: user points per face (list of [68|5, 2]
    arrays in the input's coordinates) instead of detection; x2: an aligned face that replaces
    the alignment as the style source of every face; padding: the crop around the eye centre
    (the official 256 on each side; smaller values are sgex's, e.g. fast tests)."""

    faces: str | int = "best"
    paste_back: bool = False
    track: bool = False
    landmarks: tuple | None = None
    x2: np.ndarray | None = None
    padding: tuple[int, int, int, int] = F.CROP_PADDING  # crop half-sizes (left, right, top, bottom); official 256

    def __post_init__(self):
        object.__setattr__(self, "faces", parse_faces(self.faces))


@dataclass
class FaceJob:
    """One face of a frame: its points (frame coordinates of the recipe's frame), crop params, x1."""

    points: np.ndarray
    params: F.CropParams
    x1: np.ndarray
    x2: np.ndarray | None = None
    score: float | None = None  # None for user landmarks


@dataclass
class FaceOutput:
    job: FaceJob
    output: np.ndarray  # uint8 [4H, 4W, 3]


@dataclass
class PhotoResult:
    """image: the paste-back frame, or the best face's output; faces: every processed face in
    rank order; timings: seconds per stage (STAGES)."""

    image: np.ndarray
    faces: list[FaceOutput]
    timings: dict = field(default_factory=dict)


def read_landmarks(path: str | os.PathLike, image_shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """--landmarks FILE.json: one face as a list of 68 or 5 [x, y] pairs, or several faces as a
    list of such lists (best first), or {"faces": [...]} of either; coordinates in the input
    image's pixels. SgexError (one line) for a malformed file or points outside the image."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise SgexError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SgexError(f"{p}: not a JSON landmarks file ({' '.join(str(e).split())})") from None
    if isinstance(data, dict):
        data = data.get("faces", data.get("landmarks"))
    if not isinstance(data, list) or not data:
        raise SgexError(f"{p}: expected a list of [x, y] points (or {{\"faces\": [...]}})")
    faces = data if isinstance(data[0], list) and data[0] and isinstance(data[0][0], list) else [data]
    return tuple(F.check_points(f, f"{p}: face {i}", image_shape) for i, f in enumerate(faces))


def _select(found: list, faces: str | int, what: str) -> list:
    if faces == "best":
        return found[:1]
    if faces == "all":
        return found
    if faces > len(found):
        raise SgexError(f"--faces {faces}: only {len(found)} face{'s' if len(found) != 1 else ''} "
                        f"found in {what}")
    return found[:faces]


def find_faces(rgb: np.ndarray, opts: FaceOptions, what: str) -> list:
    """The selected faces of `rgb` (Face objects, or user points), or the one-line no-face error.
    Cheap enough to run before a model loads, so a photo without a face writes nothing."""
    if opts.landmarks is not None:
        found = list(opts.landmarks)
    else:
        found = F.detect(rgb)
    if not found:
        raise SgexError(f"no face found in {what}; pass --no-align to process the whole image")
    return _select(found, opts.faces, what)


def recipe_frame(rgb: np.ndarray, recipe: Recipe, scale: int | None) -> np.ndarray:
    """The frame the crop is computed on: the input, or (superres) its PIL bicubic resize by S/4."""
    if recipe.pre_resize is None or scale is None:
        return rgb
    h, w = pre_resize_size(rgb.shape[0], rgb.shape[1], scale)
    return F.pil_resize(rgb, h, w)


def prepare(rgb: np.ndarray, task: str, opts: FaceOptions, *, what: str = "input", scale: int | None = None,
            selected: list | None = None, timings: dict | None = None) -> tuple[np.ndarray, list[FaceJob]]:
    """Steps 1-3 of the module doc -> (the recipe frame, jobs in rank order). `selected` reuses
    find_faces' result on `rgb` (re-detected when the recipe resizes the frame)."""
    timings = {} if timings is None else timings
    recipe = get_recipe(task)
    if not recipe.face_crop:
        raise SgexError(f"task {task} takes no face crop (its input is used as is); use --no-align")
    frame = recipe_frame(rgb, recipe, scale)
    t0 = time.perf_counter()
    if opts.landmarks is not None:
        fy, fx = frame.shape[0] / rgb.shape[0], frame.shape[1] / rgb.shape[1]
        chosen = [F.points_of(p) * [fx, fy] for p in (selected or find_faces(rgb, opts, what))]
    elif selected is not None and frame is rgb:
        chosen = selected
    else:
        chosen = find_faces(frame, opts, what)
    t1 = time.perf_counter()
    jobs = [_job(frame, face, opts.x2, opts.padding) for face in chosen]
    timings["detect"] = timings.get("detect", 0.0) + (t1 - t0)
    timings["crop_align"] = timings.get("crop_align", 0.0) + (time.perf_counter() - t1)
    return frame, jobs


def _job(frame: np.ndarray, face, x2: np.ndarray | None, padding) -> FaceJob:
    points = F.points_of(face)
    params = F.crop_params(frame.shape, points, padding)
    x1 = F.crop(frame, params)
    detected = isinstance(face, F.Face)
    if x2 is None:
        # dlib's faces: re-detected in the crop, as the official align_face. User landmarks: mapped
        # into the crop, so a user's own detector is the only landmark model that runs.
        lm = F.crop_landmarks(x1, params, points) if detected else F.to_crop(points, params)
        x2 = F.align(x1, lm)
    score = face.score if detected else None
    return FaceJob(points, params, x1, x2, score)


def run_jobs(engine, x1s: Sequence[np.ndarray], wplus: np.ndarray, *, seed: int = 0,
             edit_scale: float = 1.0) -> list[np.ndarray]:
    """Synth for every x1 (row i of wplus [N, 18, D] is its style): one engine call per distinct
    x1 size, the faces of one size as one batch. Outputs in input order."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, x1 in enumerate(x1s):
        by_size.setdefault(x1.shape[:2], []).append(i)
    out: list[np.ndarray | None] = [None] * len(x1s)
    for idx in by_size.values():
        y = engine.synthesize(np.stack([x1s[i] for i in idx]), wplus[idx], seed=seed, edit_scale=edit_scale)
        for i, yi in zip(idx, y):
            out[i] = yi
    return out


def compose(frame: np.ndarray, params: Sequence[F.CropParams], outputs: Sequence[np.ndarray]) -> np.ndarray:
    """Paste-back: faces.paste_canvas of the frame at the best (first) face's scale, then every
    face blended over its crop box, the worst first so the best face is on top."""
    canvas = F.paste_canvas(frame, params[0])
    for p, y in reversed(list(zip(params, outputs))):
        F.paste_back(canvas, y, F.paste_box(p, frame.shape, canvas.shape))
    return canvas


def process_photo(engine, image: np.ndarray, opts: FaceOptions | None = None, *, scale: int | None = None,
                  seed: int = 0, edit_scale: float = 1.0, what: str = "input",
                  selected: list | None = None) -> PhotoResult:
    """The whole pipeline on one RGB photo (module doc). No face: SgexError with the one-line message."""
    opts = opts or FaceOptions()
    timings: dict = {}
    frame, jobs = prepare(image, engine.task, opts, what=what, scale=scale, selected=selected, timings=timings)
    t0 = time.perf_counter()
    wplus = engine.compute_style(np.stack([j.x2 for j in jobs]))
    ys = run_jobs(engine, [j.x1 for j in jobs], wplus, seed=seed, edit_scale=edit_scale)
    t1 = time.perf_counter()
    timings["model"] = t1 - t0
    image_out = ys[0]
    if opts.paste_back:
        image_out = compose(frame, [j.params for j in jobs], ys)
    timings["paste_back"] = time.perf_counter() - t1
    return PhotoResult(image_out, [FaceOutput(j, y) for j, y in zip(jobs, ys)], timings)


def process_video(engine, frames: Iterable[np.ndarray], opts: FaceOptions, *, scale: int | None = None,
                  seed: int = 0, edit_scale: float = 1.0, batch_size: int = 1, what: str = "the video",
                  selected: list | None = None, timings: dict | None = None) -> Iterator[np.ndarray]:
    """Frames uint8 RGB [H, W, 3] -> output frames, lazily (spec 4.4): crop params and x2 (so w+)
    of every face from the first frame; every frame cropped with those params (default) or with
    the params of faces.CropTracker (opts.track). Output: the best face's 4H x 4W, or with
    paste_back the whole frame. More than one face needs paste_back (one output stream)."""
    if opts.track and opts.landmarks is not None:
        raise SgexError("--track re-detects every frame; it does not take --landmarks (first frame only)")
    timings = {} if timings is None else timings
    recipe = get_recipe(engine.task)
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise SgexError("the video has no frames")
    frame0, jobs = prepare(first, engine.task, opts, what=f"{what} (frame 0)", scale=scale,
                           selected=selected, timings=timings)
    if len(jobs) > 1 and not opts.paste_back:
        raise SgexError(f"{len(jobs)} faces in {what}: several faces on a video need --paste-back")
    t0 = time.perf_counter()
    wplus = engine.compute_style(np.stack([j.x2 for j in jobs]))
    timings["model"] = timings.get("model", 0.0) + time.perf_counter() - t0
    trackers = [F.CropTracker(j.params, j.points, padding=opts.padding) for j in jobs] if opts.track else None
    shape = first.shape
    chunk: list[np.ndarray] = []
    n = 0

    def flush():
        yield from _video_chunk(engine, chunk, jobs, trackers, wplus, recipe, scale, opts, seed,
                                edit_scale, timings, first_index=n - len(chunk))

    for i, frame in enumerate(_chain(first, it)):
        if frame.shape != shape:
            raise SgexError(f"frame {i}: size {frame.shape[:2]} differs from frame 0 {shape[:2]}")
        chunk.append(frame)
        n += 1
        if len(chunk) == batch_size:
            yield from flush()
            chunk = []
    if chunk:
        yield from flush()
    if trackers:
        missed = max(t.missed for t in trackers)
        if missed:
            log.info("--track: %d of %d frames had no face and kept the last crop", missed, n)
    timings["frames"] = n


def _chain(first, it):
    yield first
    yield from it


def _video_chunk(engine, chunk, jobs, trackers, wplus, recipe, scale, opts, seed, edit_scale, timings,
                 first_index: int) -> Iterator[np.ndarray]:
    t0 = time.perf_counter()
    frames, params = [], []
    for k, raw in enumerate(chunk):
        frame = recipe_frame(raw, recipe, scale)
        if trackers is not None and first_index + k > 0:
            found = F.detect(frame)
            params.append([tr.update(found) for tr in trackers])
        else:
            params.append([j.params for j in jobs])
        frames.append(frame)
    t1 = time.perf_counter()
    x1s = [F.crop(frame, p) for frame, ps in zip(frames, params) for p in ps]
    t2 = time.perf_counter()
    rows = np.concatenate([wplus] * len(frames))
    ys = run_jobs(engine, x1s, rows, seed=seed, edit_scale=edit_scale)
    t3 = time.perf_counter()
    nj = len(jobs)
    for k, frame in enumerate(frames):
        outs = ys[k * nj:(k + 1) * nj]
        if opts.paste_back:
            yield compose(frame, params[k], outs)
        else:
            yield outs[0]
    t4 = time.perf_counter()
    for key, dt in (("detect", t1 - t0), ("crop_align", t2 - t1), ("model", t3 - t2), ("paste_back", t4 - t3)):
        timings[key] = timings.get(key, 0.0) + dt

"""Calibration inputs: what the graphs of a task see in deployment, as float32 feeds.

A calibration set is a list of `Sample`s, each one runtime-sized input of batch 1:

    x1  float32 [1, C, h, w]   C = 3 (RGB in [-1,1]), 1 (sketch in [0,1]) or 19 (one-hot mask);
                               h, w multiples of 8 and <= res/4, the largest x1 of the bucket
                               (buckets are named by their output side res, runtime/buckets.py)
    x2  float32 [1, 3, 256, 256] in [-1,1] or None (RGB tasks: the aligned face the style code is
                               computed from; here the centre square of the image resized to 256,
                               since calibration needs the value ranges of a face-sized input,
                               not a landmark alignment)
    seed int                   drives this sample's noise maps and z, exactly as the runtime does

Sources (one of):
  * a folder of images (sorted by name; .png/.jpg/.jpeg/.bmp/.webp), read with OpenCV;
  * a video file, decoded with OpenCV by runtime.video (frames spread evenly over the clip);
  * nothing: seeded synthetic inputs (smooth random colour fields, sparse strokes for sketches,
    blocky label maps for masks), so a plan can be made without data and is reproducible.

Images are centre-cropped to the bucket's largest x1 side (res/4) when larger and reflect-padded
to the next multiple of 8 with the runtime's own helpers (runtime.io). Mask tasks read
label maps (pixel value = class index 0..18). Bad data raises SgexError with one line.

`graph_feeds` turns a sample into the feed dict of one graph by reading the graph's input names,
so the same sample serves style, synth (x1, wplus, editing_w, noise_0..16) and translate (x, z,
noise_0..16) graphs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from runtime.errors import SgexError
from runtime.tasks import N_MASK_CLASSES, N_NOISE, OUTPUT_SCALE, SIZE_MULTIPLE, get_task

EDIT_SCALES = (1.0, -1.0, 2.0, -2.0)  # editing_w scales cycled over the samples (web UI range -2..2)


@dataclass
class Sample:
    name: str
    x1: np.ndarray  # float32 [1, C, h, w]
    x2: np.ndarray | None  # float32 [1, 3, 256, 256] or None
    seed: int


def _cv2():
    import cv2

    return cv2


def _fit_to_bucket(img: np.ndarray, side: int) -> np.ndarray:
    """HxW(xC) uint8 -> centre crop to <= side per axis, then the runtime's bottom/right reflect
    pad to a multiple of 8 (runtime.io.pad_to_multiple)."""
    from runtime.io import pad_to_multiple

    h, w = img.shape[:2]
    th, tw = min(h, side), min(w, side)
    top, left = (h - th) // 2, (w - tw) // 2
    img = img[top : top + th, left : left + tw]
    # reflect needs the pad to be shorter than the side; tiny images fall back to edge padding
    if th > -th % SIZE_MULTIPLE and tw > -tw % SIZE_MULTIPLE:
        return pad_to_multiple(img[None])[0]
    pads = [(0, -th % SIZE_MULTIPLE), (0, -tw % SIZE_MULTIPLE)] + [(0, 0)] * (img.ndim - 2)
    return np.pad(img, pads, mode="edge")


def sample_from_image(task: str, img: np.ndarray, side: int, name: str, seed: int) -> Sample:
    """side: the largest x1 side (res/4). One decoded image (runtime.io.read_image: HxWx3 RGB, HxW grey or HxWx4 RGBA) -> a Sample,
    pre-processed with the runtime's own helpers (runtime.io)."""
    from runtime import io as rio

    t = get_task(task)
    if img.ndim == 3 and img.shape[2] == 4:
        img = np.ascontiguousarray(img[:, :, :3])
    if t.input_kind == "rgb" and img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    try:
        img = rio.task_image(img, t, what=name)
    except SgexError as e:
        raise SgexError(f"calibration data: {e}") from None
    fitted = _fit_to_bucket(img, side)[None]
    if t.input_kind == "mask":
        return Sample(name, rio.mask_to_model(fitted), None, seed)
    if t.input_kind == "sketch":
        return Sample(name, rio.sketch_to_model(fitted), None, seed)
    return Sample(name, rio.rgb_to_model(fitted), rio.rgb_to_model(rio.centre_square_x2(img)[None]), seed)


def _spread(n_total: int, n: int) -> list[int]:
    """n indices spread evenly over range(n_total) (all of them when n >= n_total)."""
    if n >= n_total:
        return list(range(n_total))
    return sorted({int(round(i * (n_total - 1) / max(1, n - 1))) for i in range(n)})


def _video_frames(path: str, n: int) -> list[tuple[str, np.ndarray]]:
    """n frames spread over the clip (runtime.video.VideoReader: SgexError for an unreadable or
    frameless video). When the container states no frame count, every frame is decoded first."""
    from runtime.video import VideoReader

    reader = VideoReader(path)
    base = os.path.basename(path)
    total = reader.info.frames
    if total > 0:
        want = set(_spread(total, n))
        picked = [(f"{base}#{i}", f) for i, f in enumerate(reader) if i in want]
    else:
        frames = list(reader)
        picked = [(f"{base}#{i}", frames[i]) for i in _spread(len(frames), n)]
    if not picked:
        raise SgexError(f"{path}: the video has no frames")
    return picked


def synthetic_sample(task: str, side: int, seed: int) -> Sample:
    """A seeded synthetic input at the bucket's largest x1 (side x side, side = res/4)."""
    cv2 = _cv2()
    rng = np.random.default_rng(seed)
    kind = get_task(task).input_kind
    if kind == "mask":
        coarse = rng.integers(0, N_MASK_CLASSES, size=(max(1, side // 16),) * 2).astype(np.uint8)
        labels = cv2.resize(coarse, (side, side), interpolation=cv2.INTER_NEAREST)
        from runtime.io import mask_to_model

        return Sample(f"synthetic-{seed}", mask_to_model(labels[None]), None, seed)
    if kind == "sketch":
        img = np.full((side, side), 255, np.uint8)
        for _ in range(12):
            p = rng.integers(0, side, size=(2, 2))
            cv2.line(img, tuple(int(v) for v in p[0]), tuple(int(v) for v in p[1]), 0, thickness=int(rng.integers(1, 4)))
        return Sample(f"synthetic-{seed}", (img.astype(np.float32)[None, None] / 255.0).astype(np.float32), None, seed)
    coarse = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (side, side), interpolation=cv2.INTER_CUBIC)
    img = np.clip(smooth + rng.normal(0, 12, size=smooth.shape), 0, 255).astype(np.uint8)
    from runtime.io import centre_square_x2, rgb_to_model

    return Sample(f"synthetic-{seed}", rgb_to_model(img[None]), rgb_to_model(centre_square_x2(img)[None]), seed)


def load_samples(task: str, res: int, data: str | None = None, samples: int = 8, seed: int = 0) -> list[Sample]:
    """The calibration set: `samples` inputs for `task` in bucket `res` (output side; x1 up to res/4).

    data: a folder of images, a video file, or None (synthetic). Sample i uses seed + i for its
    noise and z. Raises SgexError for an empty folder, unreadable files or a frameless video."""
    get_task(task)
    side = res // OUTPUT_SCALE
    if samples < 1:
        raise SgexError(f"--samples must be >= 1, got {samples}")
    if data is None:
        return [synthetic_sample(task, side, seed + i) for i in range(samples)]
    from runtime import io as rio

    if os.path.isdir(data):
        files = rio.list_images(data)
        items = [(f.name, rio.read_image(f)) for f in (files[i] for i in _spread(len(files), samples))]
    elif os.path.isfile(data):
        if rio.is_video_path(data):
            items = _video_frames(data, samples)
        elif rio.is_image_path(data):
            items = [(os.path.basename(data), rio.read_image(data))]
        else:
            raise SgexError(f"calibration data {data} is neither an image folder, an image nor a video "
                            f"({', '.join(rio.VIDEO_EXTS)})")
    else:
        raise SgexError(f"calibration data {data} does not exist")
    return [sample_from_image(task, img, side, name, seed + i) for i, (name, img) in enumerate(items)]


def random_feeds(sample: Sample, *, noise: bool, z_dim: int | None) -> dict[str, np.ndarray]:
    """z [1, z_dim] and/or noise_0..noise_16 [1, 1, h_j, w_j] for the sample's seed, drawn by the
    runtime's own generator (runtime.engine.make_random_inputs), so calibration sees the noise
    and codes a deployment sees for that seed."""
    from runtime.engine import make_random_inputs

    _, _, h, w = sample.x1.shape
    return make_random_inputs(sample.seed, 1, h, w, noise=noise, z_dim=z_dim)


def graph_feeds(
    input_names: list[str],
    sample: Sample,
    *,
    style_dim: int,
    wplus: np.ndarray | None = None,
    editing_w: np.ndarray | None = None,
    index: int = 0,
) -> dict[str, np.ndarray]:
    """Feed dict for a graph with these input names.

    wplus float32 [1, 18, D] (synth graphs: the FP32 style graph's output for sample.x2);
    editing_w float32 [1, 18, D] (edit: the checkpoint's editing_w[0:1]), scaled by
    EDIT_SCALES[index % 4] so the set covers the user range."""
    feeds: dict[str, np.ndarray] = {}
    rand = random_feeds(sample, noise=any(n.startswith("noise_") for n in input_names),
                        z_dim=style_dim if "z" in input_names else None)
    for name in input_names:
        if name == "x2":
            if sample.x2 is None:
                raise SgexError(f"sample {sample.name} has no aligned face x2")
            feeds[name] = sample.x2
        elif name in ("x1", "x"):
            feeds[name] = sample.x1
        elif name == "wplus":
            if wplus is None:
                raise ValueError("graph takes wplus: pass the style graph's output")
            feeds[name] = wplus.astype(np.float32)
        elif name == "editing_w":
            if editing_w is None:
                raise ValueError("graph takes editing_w: pass the checkpoint's editing_w[0:1]")
            feeds[name] = (editing_w * EDIT_SCALES[index % len(EDIT_SCALES)]).astype(np.float32)
        elif name in rand:
            feeds[name] = rand[name]
        else:
            raise ValueError(f"unknown graph input {name!r} (expected x2, x1, x, wplus, editing_w, z, noise_0..{N_NOISE - 1})")
    return feeds

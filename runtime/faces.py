"""Faces: detection, the official crop and FFHQ alignment (spec/styleganex.md 4.0), and what sgex
adds on top of the official code (every face, paste-back, tracking).

The official steps, one function each, in the order the official scripts run them:

    faces  = detect(rgb)                         # dlib frontal detector (1 upsample) + 68 landmarks
    params = crop_params(rgb.shape, faces[0])    # get_video_crop_parameter (spec 4.0)
    x1     = crop(rgb, params)                   # cv2.resize(frame, (w, h))[top:bottom, left:right]
    x2     = align(x1, crop_landmarks(x1, params, faces[0]))   # align_face, run on the crop (spec 4.0)

Landmarks from any other detector work everywhere a Face does: an array [68, 2] in dlib's order or
[5, 2] in the common 5-point order (image x, y; "left" is the left of the image):

    0 left eye centre  = mean of dlib points 36..41     1 right eye centre = mean of points 42..47
    2 nose tip         = dlib point 30                  3 left mouth corner = dlib point 48
    4 right mouth corner = dlib point 54

The crop uses only the two eye centres and the alignment only the eye centres and the mouth
corners, so 5 points give exactly the 68-point result; the nose tip is carried but unused.

Beyond the official code (layered on the steps, never mixed into them): `detect` returns every
face ranked best first (the official code keeps the last detection, which on scikit-image's
astronaut photo is the mission patch); `paste_back` blends a processed face into the whole frame;
`CropTracker` follows a moving face in a video.

Models: dlib's `shape_predictor_68_face_landmarks.dat` ships inside the face-recognition-models
package (nothing is downloaded). Its training data (iBUG 300-W) is licensed for non-commercial
research only; see the README beside StyleGANEX's own S-Lab licence.

Imports without dlib, PIL, scipy (each is imported in the function that uses it).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence, Union

import numpy as np

from runtime.errors import MissingDependency, SgexError, require
from runtime.tasks import ALIGNED_SIZE, OUTPUT_SCALE

log = logging.getLogger(__name__)

__all__ = [
    "Face", "CropParams", "predictor_path", "detect", "points_of", "five_points", "crop_params",
    "pil_resize", "crop", "align", "crop_landmarks", "to_crop", "check_points", "paste_canvas", "paste_box", "feather_mask",
    "paste_back", "CropTracker", "DETECT_UPSAMPLE", "CROP_PADDING", "EYE_DISTANCE", "FEATHER",
    "TRACK_ALPHA", "CANVAS_FILTER",
]

DETECT_UPSAMPLE = 1  # dlib detector upsampling, as the official code
EYE_DISTANCE = 64.0  # inter-ocular distance of x1 in pixels (spec 4.0)
CROP_PADDING = (256, 256, 256, 256)  # left, right, top, bottom around the eye centre (spec 4.0)
CROP_MULTIPLE = 8  # crop bounds are floored to multiples of 8
FEATHER = 0.0625  # paste-back: the mask ramps 0 -> 1 over this fraction of the box's shorter side
CANVAS_FILTER = "bicubic"  # paste-back: the rest of the frame is the source upscaled with cv2 INTER_CUBIC
TRACK_ALPHA = 0.5  # --track: exponential moving average weight of the newest eye centre

# dlib 68-point indices (iBUG 300-W order) used by the crop and the alignment
LEFT_EYE = slice(36, 42)
RIGHT_EYE = slice(42, 48)
NOSE_TIP = 30
MOUTH_LEFT = 48
MOUTH_RIGHT = 54


@dataclass(frozen=True)
class Face:
    """One detection. box: (left, top, right, bottom) in pixels (dlib's rectangle); score: the
    detector's confidence (higher is better); landmarks: float64 [68, 2] (x, y), the predictor's
    points exactly (or [5, 2] for points given by the user)."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> int:
        return max(0, self.box[2] - self.box[0]) * max(0, self.box[3] - self.box[1])


Points = Union[Face, np.ndarray, Sequence[Sequence[float]]]


class CropParams(NamedTuple):
    """get_video_crop_parameter's result: the frame is resized to w x h, then cropped to
    [top:bottom, left:right]. x1 is (bottom - top) x (right - left), both multiples of 8."""

    h: int
    w: int
    top: int
    bottom: int
    left: int
    right: int
    scale: float

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the crop x1."""
        return self.bottom - self.top, self.right - self.left


# -- models -------------------------------------------------------------------------------------

def predictor_path() -> Path:
    """dlib's 68-point predictor inside the face-recognition-models package, located without
    importing the package (its __init__ needs pkg_resources, which new setuptools lacks)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency("face-recognition-models (dlib's 68-point landmark model)", "faces")
    for root in spec.submodule_search_locations:
        p = Path(root) / "models" / "shape_predictor_68_face_landmarks.dat"
        if p.is_file():
            return p
    raise MissingDependency("shape_predictor_68_face_landmarks.dat", "faces",
                            "face-recognition-models is installed but lacks the model file")


@functools.lru_cache(maxsize=1)
def _dlib_models():
    dlib = require("dlib", "faces", "dlib (dlib-bin)")
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(predictor_path()))


# -- the official steps ---------------------------------------------------------------------------

def detect(rgb: np.ndarray, upsample: int = DETECT_UPSAMPLE) -> list[Face]:
    """Every face in uint8 RGB [H, W, 3], best first (score, then box area, both descending).

    dlib's frontal face detector with `upsample` (1, as the official code) and its scores, then
    the 68-point predictor on each box (spec 4.0). The official code uses the *last* detection."""
    rgb = _check_rgb(rgb, "image")
    detector, predictor = _dlib_models()
    rects, scores, _ = detector.run(rgb, upsample, 0.0)
    faces = []
    for r, s in zip(rects, scores):
        shape = predictor(rgb, r)
        lm = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
        faces.append(Face((r.left(), r.top(), r.right(), r.bottom()), float(s), lm))
    faces.sort(key=lambda f: (-f.score, -f.area))
    return faces


def points_of(face: Points) -> np.ndarray:
    """The landmarks of a Face, or user points, as float64 [68, 2] or [5, 2] (checked)."""
    pts = face.landmarks if isinstance(face, Face) else face
    return check_points(pts)


def check_points(points, what: str = "landmarks", image_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """float64 [68, 2] or [5, 2], finite, and (with image_shape) inside the image; SgexError otherwise."""
    try:
        pts = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise SgexError(f"{what}: expected a list of [x, y] pairs (68 or 5 points)") from None
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] not in (68, 5):
        raise SgexError(f"{what}: expected 68 or 5 [x, y] points, got shape {list(pts.shape)}")
    if not np.isfinite(pts).all():
        raise SgexError(f"{what}: points must be finite numbers")
    if image_shape is not None:
        h, w = image_shape[:2]
        bad = ~((pts[:, 0] >= 0) & (pts[:, 0] <= w - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= h - 1))
        if bad.any():
            i = int(np.argmax(bad))
            raise SgexError(f"{what}: point {i} ({pts[i, 0]:g}, {pts[i, 1]:g}) is outside the {w}x{h} image")
    return pts


def five_points(face: Points) -> np.ndarray:
    """float64 [5, 2]: eye centres, nose tip, mouth corners (the mapping in the module doc)."""
    pts = points_of(face)
    if pts.shape[0] == 5:
        return pts
    return np.stack([pts[LEFT_EYE].mean(axis=0), pts[RIGHT_EYE].mean(axis=0), pts[NOSE_TIP],
                     pts[MOUTH_LEFT], pts[MOUTH_RIGHT]])


def crop_params(image_shape: tuple[int, ...], landmarks: Points,
                padding: Sequence[int] = CROP_PADDING) -> CropParams:
    """get_video_crop_parameter (spec 4.0), for a frame of `image_shape` (H, W[, C]).

    scale = 64 / (x of the right eye centre - x of the left eye centre); the eye midpoint times
    scale is the centre (cx, cy); h, w = round(H * scale), round(W * scale);
    left = max(round(cx - padding[0]), 0) // 8 * 8, right = min(round(cx + padding[1]), w) // 8 * 8,
    top/bottom the same with cy, padding[2], padding[3] and h. round() is Python's (half to even)."""
    el, er = five_points(landmarks)[:2]
    dx = er[0] - el[0]
    if not dx > 0:
        raise SgexError("landmarks: the right eye must be to the right of the left eye (image x)")
    scale = EYE_DISTANCE / dx
    cx, cy = (er + el) / 2 * scale
    h, w = round(image_shape[0] * scale), round(image_shape[1] * scale)
    m = CROP_MULTIPLE
    left = max(round(cx - padding[0]), 0) // m * m
    right = min(round(cx + padding[1]), w) // m * m
    top = max(round(cy - padding[2]), 0) // m * m
    bottom = min(round(cy + padding[3]), h) // m * m
    if right - left < m or bottom - top < m:
        raise SgexError(f"the face crop is empty ({bottom - top}x{right - left}): the face is too close "
                        f"to the image border or too small")
    return CropParams(int(h), int(w), int(top), int(bottom), int(left), int(right), float(scale))


def pil_resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """The superres raw-input resize (spec 4.1): PIL resize to width x height with BICUBIC (the
    Pillow default the official script relies on). The same size returns the input unchanged."""
    Image = require("PIL.Image", "faces", "Pillow")
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC))


def crop(rgb: np.ndarray, params: CropParams) -> np.ndarray:
    """The official x1: cv2.resize(frame, (w, h)) (INTER_LINEAR) then [top:bottom, left:right]."""
    import cv2

    p = params
    return np.ascontiguousarray(cv2.resize(rgb, (p.w, p.h))[p.top:p.bottom, p.left:p.right])


def align(rgb: np.ndarray, landmarks: Points, size: int = ALIGNED_SIZE) -> np.ndarray:
    """align_face (spec 4.0, the FFHQ alignment with output_size = transform_size = `size`):
    uint8 RGB [H, W, 3] and its landmarks -> uint8 [size, size, 3].

    The oriented square: e = eye midpoint, d = right eye - left eye, m = mouth midpoint - e;
    x = (d - perp(m)) normalised, times max(2 |d|, 1.8 |m|), with perp(v) = (-v_y, v_x); y = perp(x);
    centre c = e + 0.1 m; corners c-x-y, c-x+y, c+x+y, c+x-y; side q = 2 |x|. Then, in order:
    shrink by s = floor(q / size / 2) with LANCZOS when s > 1 (the official ANTIALIAS); crop to
    the quad's bounds plus a border of max(rint(0.1 q), 3), clipped to the image; if the quad still
    leaves the image by more than border - 4, reflect-pad by max(that, rint(0.3 q)) and blend the
    pad towards a Gaussian blur (sigma 0.02 q) and the per-channel median; then PIL's QUAD
    transform with BILINEAR (corner coordinates + 0.5)."""
    Image = require("PIL.Image", "faces", "Pillow")
    rgb = _check_rgb(rgb, "image")
    el, er, _, ml, mr = five_points(landmarks)
    eye_mid = (el + er) * 0.5
    eye_to_eye = er - el
    eye_to_mouth = (ml + mr) * 0.5 - eye_mid

    def perp(v):
        return np.array([-v[1], v[0]])

    x = eye_to_eye - perp(eye_to_mouth)
    x = x / np.hypot(*x)
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = perp(x)
    c = eye_mid + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    qsize = np.hypot(*x) * 2

    img = Image.fromarray(rgb)
    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:
        img = img.resize((int(np.rint(img.size[0] / shrink)), int(np.rint(img.size[1] / shrink))),
                         Image.Resampling.LANCZOS)
        quad = quad / shrink
        qsize = qsize / shrink

    border = max(int(np.rint(qsize * 0.1)), 3)
    lo = np.floor(quad.min(axis=0)).astype(int)
    hi = np.ceil(quad.max(axis=0)).astype(int)
    box = (max(lo[0] - border, 0), max(lo[1] - border, 0),
           min(hi[0] + border, img.size[0]), min(hi[1] + border, img.size[1]))
    if box[2] - box[0] < img.size[0] or box[3] - box[1] < img.size[1]:
        img = img.crop(box)
        quad = quad - np.array(box[:2])

    lo = np.floor(quad.min(axis=0)).astype(int)
    hi = np.ceil(quad.max(axis=0)).astype(int)
    pad = np.array([max(border - lo[0], 0), max(border - lo[1], 0),
                    max(hi[0] - img.size[0] + border, 0), max(hi[1] - img.size[1] + border, 0)])
    if pad.max() > border - 4:
        img, quad = _pad_blend(img, quad, qsize, np.maximum(pad, int(np.rint(qsize * 0.3))))

    out = img.transform((size, size), Image.Transform.QUAD, (quad + 0.5).flatten(), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def _pad_blend(img, quad: np.ndarray, qsize: float, pad: np.ndarray):
    """align's padding step: reflect-pad (left, top, right, bottom) = pad, then blend each pixel
    towards a Gaussian blur by clip(3 t + 1, 0, 1) and towards the median by clip(t, 0, 1), where
    t = 1 - (distance to the nearest padded edge, in units of that edge's pad). The arithmetic
    follows the official dtypes: a float32 image, float32 coordinates divided by int64 pads."""
    ndimage = require("scipy.ndimage", "faces", "SciPy")
    Image = require("PIL.Image", "faces", "Pillow")
    a = np.pad(np.asarray(img, dtype=np.float32), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
    h, w = a.shape[:2]
    yy = np.arange(h, dtype=np.float32)[:, None, None]
    xx = np.arange(w, dtype=np.float32)[None, :, None]
    tx = 1.0 - np.minimum(xx / pad[0], (np.float32(w - 1) - xx) / pad[2])
    ty = 1.0 - np.minimum(yy / pad[1], (np.float32(h - 1) - yy) / pad[3])
    t = np.maximum(tx, ty)
    sigma = qsize * 0.02
    a += (ndimage.gaussian_filter(a, [sigma, sigma, 0]) - a) * np.clip(t * 3.0 + 1.0, 0.0, 1.0)
    a += (np.median(a, axis=(0, 1)) - a) * np.clip(t, 0.0, 1.0)
    out = Image.fromarray(np.uint8(np.clip(np.rint(a), 0, 255)), "RGB")
    return out, quad + pad[:2]


def crop_landmarks(x1: np.ndarray, params: CropParams, face: Points) -> np.ndarray:
    """The landmarks align() uses on the crop x1 (spec 4.0: the official code runs detection again
    on the crop). Of the faces found in x1, the one whose eye midpoint is nearest to `face`'s
    (mapped into crop coordinates) is taken, so another face or the patch is never aligned
    instead. When no face is found in x1, `face`'s points mapped into the crop are used (logged)."""
    mapped = to_crop(points_of(face), params)
    found = detect(x1)
    if not found:
        log.info("no face re-detected in the %dx%d crop: aligning with the frame's landmarks mapped "
                 "into the crop", *params.size[::-1])
        return mapped
    target = _eye_mid(mapped)
    return min(found, key=lambda f: float(np.hypot(*(_eye_mid(f.landmarks) - target)))).landmarks


def _eye_mid(points: np.ndarray) -> np.ndarray:
    el, er = five_points(points)[:2]
    return (el + er) / 2


def to_crop(points: np.ndarray, params: CropParams) -> np.ndarray:
    """Frame coordinates -> crop coordinates: times scale, minus (left, top). (cv2.resize maps by
    the size ratio w / W, which differs from scale only by the rounding of w.)"""
    return points * params.scale - np.array([params.left, params.top], dtype=np.float64)


def _check_rgb(rgb: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = f"{rgb.dtype} {list(rgb.shape)}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise SgexError(f"{what}: expected uint8 RGB [H, W, 3], got {got}")
    return np.ascontiguousarray(rgb)


# -- beyond the official code: paste-back ----------------------------------------------------------

def paste_canvas(rgb: np.ndarray, params: CropParams) -> np.ndarray:
    """The whole frame at the output scale of `params`: the source resized to (4 w, 4 h) with
    OpenCV bicubic (CANVAS_FILTER), so the face output of `params` lands on it unresampled."""
    import cv2

    return cv2.resize(rgb, (OUTPUT_SCALE * params.w, OUTPUT_SCALE * params.h), interpolation=cv2.INTER_CUBIC)


def paste_box(params: CropParams, frame_shape: tuple[int, ...], canvas_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) on the canvas of the crop of `params` (made for a frame of
    `frame_shape`). For the canvas of the same params it is exactly 4 x (top, bottom, left, right)."""
    fy = canvas_shape[0] / params.h
    fx = canvas_shape[1] / params.w
    return (int(round(params.top * fy)), int(round(params.bottom * fy)),
            int(round(params.left * fx)), int(round(params.right * fx)))


def feather_mask(height: int, width: int, feather: float = FEATHER,
                 edges: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> np.ndarray:
    """float32 [height, width, 1]: 1 inside, ramping linearly to 0 at the box edges over
    max(1, feather x the shorter side) pixels. edges (top, bottom, left, right): False leaves that
    edge hard (a box edge on the frame border has nothing to blend with)."""
    ramp = max(1.0, feather * min(height, width))

    def axis(n, lo, hi):
        i = np.arange(n, dtype=np.float32) + 0.5
        v = np.ones(n, dtype=np.float32)
        if lo:
            v = np.minimum(v, i / ramp)
        if hi:
            v = np.minimum(v, (n - i) / ramp)
        return np.clip(v, 0.0, 1.0)

    t, b, le, r = edges
    return (axis(height, t, b)[:, None] * axis(width, le, r)[None, :])[:, :, None]


def paste_back(canvas: np.ndarray, face_out: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Blend a face output into `canvas` (uint8 [H, W, 3], modified in place and returned) over
    box (top, bottom, left, right) through feather_mask; only the box is read and written. An
    output of another size than the box is resized to it (INTER_AREA)."""
    import cv2

    top, bottom, left, right = box
    bh, bw = bottom - top, right - left
    if face_out.shape[:2] != (bh, bw):
        face_out = cv2.resize(face_out, (bw, bh), interpolation=cv2.INTER_AREA)
    edges = (top > 0, bottom < canvas.shape[0], left > 0, right < canvas.shape[1])
    m = feather_mask(bh, bw, edges=edges)
    region = canvas[top:bottom, left:right]
    # Where the mask is 1 the blend is the face output exactly, so only the border strips of the
    # ramp are blended in float (a 2048x2048 box: ~10x less work than blending all of it).
    r = min(int(np.ceil(max(1.0, FEATHER * min(bh, bw)))), bh // 2, bw // 2)
    strips = [(slice(0, r), slice(None)), (slice(bh - r, bh), slice(None)),
              (slice(r, bh - r), slice(0, r)), (slice(r, bh - r), slice(bw - r, bw))]
    blended = []
    for sl in strips:
        a = region[sl].astype(np.float32)
        blended.append(np.clip(np.rint(a + (face_out[sl].astype(np.float32) - a) * m[sl]), 0, 255).astype(np.uint8))
    region[...] = face_out
    for sl, v in zip(strips, blended):
        region[sl] = v
    return canvas


# -- beyond the official code: tracking --------------------------------------------------------

class CropTracker:
    """--track: crop parameters that follow a moving face through a video.

    The first frame's parameters fix the scale and the crop size (so every output frame has one
    size and w+ comes from the first frame, as the official recipe). Each later frame the face
    nearest to the tracked one is re-detected; its eye midpoint updates an exponential moving
    average c <- (1 - TRACK_ALPHA) c + TRACK_ALPHA c_new, and the crop window of the fixed size is
    centred as crop_params would centre it, kept inside the frame. A frame without a face keeps the
    last parameters (counted in `missed`)."""

    def __init__(self, params: CropParams, face: Points, alpha: float = TRACK_ALPHA,
                 padding: Sequence[int] = CROP_PADDING):
        if not 0.0 < alpha <= 1.0:
            raise SgexError(f"tracking alpha must be in (0, 1], got {alpha}")
        self.params = params
        self.alpha = float(alpha)
        self.padding = tuple(padding)
        self.centre = _eye_mid(points_of(face))  # frame coordinates
        self.missed = 0

    def update(self, faces: list[Face]) -> CropParams:
        if not faces:
            self.missed += 1
            if self.missed == 1:
                log.info("--track: a frame without a face keeps the last crop (counted; total at the end)")
            return self.params
        new = min((_eye_mid(f.landmarks) for f in faces), key=lambda c: float(np.hypot(*(c - self.centre))))
        self.centre = (1.0 - self.alpha) * self.centre + self.alpha * new
        p = self.params
        ch, cw = p.size
        cx, cy = self.centre * p.scale
        m = CROP_MULTIPLE
        left = min(max(round(cx - self.padding[0]), 0) // m * m, (p.w - cw) // m * m)
        top = min(max(round(cy - self.padding[2]), 0) // m * m, (p.h - ch) // m * m)
        self.params = p._replace(top=int(top), bottom=int(top + ch), left=int(left), right=int(left + cw))
        return self.params

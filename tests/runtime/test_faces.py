"""runtime.faces on a real photo: scikit-image's public-domain `astronaut` (NASA, Eileen Collins).

Every expected value is derived here from the formulas of spec 4.0 and the FFHQ alignment maths,
written independently of runtime/faces.py (which is only called as the thing under test), and
dlib is called directly for the detections and landmarks. Detection costs about 0.2 s a call on
this machine, so it runs once per session (fixtures in conftest.py and below)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

dlib = pytest.importorskip("dlib")
pytest.importorskip("PIL")
pytest.importorskip("scipy")
pytest.importorskip("skimage.data")

import cv2  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

from runtime import faces  # noqa: E402
from runtime.errors import SgexError  # noqa: E402


def _predictor_file() -> str:
    roots = importlib.util.find_spec("face_recognition_models").submodule_search_locations
    return f"{list(roots)[0]}/models/shape_predictor_68_face_landmarks.dat"


@pytest.fixture(scope="session")
def dlib_truth(astronaut):
    """dlib called directly: [(rect, score, landmarks [68, 2])] in dlib's own order."""
    det = dlib.get_frontal_face_detector()
    pred = dlib.shape_predictor(_predictor_file())
    rects, scores, _ = det.run(astronaut, 1, 0.0)
    out = []
    for r, s in zip(rects, scores):
        lm = np.array([[p.x, p.y] for p in pred(astronaut, r).parts()], dtype=np.float64)
        out.append((r, s, lm))
    return out


# -- the formulas of spec 4.0, written here ---------------------------------------------------------

def ref_crop_params(shape, lm, pad=256):
    left_eye_x = np.mean(lm[36:42, 0])
    right_eye_x = np.mean(lm[42:48, 0])
    s = 64.0 / (right_eye_x - left_eye_x)
    centre = (np.mean(lm[36:42], axis=0) + np.mean(lm[42:48], axis=0)) / 2 * s
    H, W = round(shape[0] * s), round(shape[1] * s)
    left = max(round(centre[0] - pad), 0) // 8 * 8
    right = min(round(centre[0] + pad), W) // 8 * 8
    top = max(round(centre[1] - pad), 0) // 8 * 8
    bottom = min(round(centre[1] + pad), H) // 8 * 8
    return H, W, top, bottom, left, right, s


def ref_align(img, lm, out=256):
    """FFHQ alignment with output_size = transform_size = out, from the maths."""
    e_l, e_r = lm[36:42].mean(0), lm[42:48].mean(0)
    e = (e_l + e_r) / 2
    d = e_r - e_l
    m = (lm[48] + lm[54]) / 2 - e
    rot90 = np.array([[0.0, -1.0], [1.0, 0.0]])  # (vx, vy) -> (-vy, vx)
    xv = d - rot90 @ m
    xv = xv / np.linalg.norm(xv) * max(2.0 * np.linalg.norm(d), 1.8 * np.linalg.norm(m))
    yv = rot90 @ xv
    c = e + 0.1 * m
    corners = np.array([c - xv - yv, c - xv + yv, c + xv + yv, c + xv - yv])
    q = 2 * np.linalg.norm(xv)
    pil = Image.fromarray(img)
    k = int(np.floor(q / out / 2))
    if k > 1:
        pil = pil.resize((int(np.rint(pil.width / k)), int(np.rint(pil.height / k))), Image.LANCZOS)
        corners, q = corners / k, q / k
    b = max(int(np.rint(0.1 * q)), 3)
    x0, y0 = np.floor(corners.min(0)).astype(int) - b
    x1, y1 = np.ceil(corners.max(0)).astype(int) + b
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, pil.width), min(y1, pil.height)
    if (x1 - x0, y1 - y0) != (pil.width, pil.height):
        pil = pil.crop((x0, y0, x1, y1))
        corners = corners - [x0, y0]
    lo, hi = np.floor(corners.min(0)).astype(int), np.ceil(corners.max(0)).astype(int)
    p = np.array([max(b - lo[0], 0), max(b - lo[1], 0), max(hi[0] - pil.width + b, 0), max(hi[1] - pil.height + b, 0)])
    if p.max() > b - 4:
        p = np.maximum(p, int(np.rint(0.3 * q)))
        a = np.pad(np.float32(np.asarray(pil)), ((p[1], p[3]), (p[0], p[2]), (0, 0)), mode="reflect")
        hh, ww = a.shape[:2]
        gy, gx = np.mgrid[:hh, :ww].astype(np.float32)
        gy, gx = gy[..., None], gx[..., None]
        wgt = np.maximum(1.0 - np.minimum(gx / p[0], (ww - 1 - gx) / p[2]),
                         1.0 - np.minimum(gy / p[1], (hh - 1 - gy) / p[3]))
        a += (ndimage.gaussian_filter(a, [0.02 * q, 0.02 * q, 0]) - a) * np.clip(3.0 * wgt + 1.0, 0, 1)
        a += (np.median(a, axis=(0, 1)) - a) * np.clip(wgt, 0, 1)
        pil = Image.fromarray(np.uint8(np.clip(np.rint(a), 0, 255)), "RGB")
        corners = corners + p[:2]
    return np.asarray(pil.transform((out, out), Image.QUAD, (corners + 0.5).ravel(), Image.BILINEAR))


# -- detection --------------------------------------------------------------------------------------

def test_face_first_patch_second(found, dlib_truth):
    assert len(found) == len(dlib_truth) == 2
    face, patch = found
    # the face is the upper box (head), the patch the lower one (on the suit)
    assert face.box[3] < patch.box[1]
    assert face.score > patch.score
    # dlib's own order puts the patch last: the official code would align it
    assert dlib_truth[-1][0].top() == patch.box[1]


def test_boxes_scores_and_landmarks_are_dlibs(found, dlib_truth):
    by_top = {r.top(): (r, s, lm) for r, s, lm in dlib_truth}
    for f in found:
        r, s, lm = by_top[f.box[1]]
        assert f.box == (r.left(), r.top(), r.right(), r.bottom())
        assert f.score == s
        assert f.landmarks.shape == (68, 2) and f.landmarks.dtype == np.float64
        np.testing.assert_array_equal(f.landmarks, lm)


def test_ranking_ties_break_by_area(monkeypatch, astronaut):
    """Equal scores: the bigger box first."""
    class R:
        def __init__(self, l, t, r, b):
            self.box = (l, t, r, b)

        def left(self): return self.box[0]
        def top(self): return self.box[1]
        def right(self): return self.box[2]
        def bottom(self): return self.box[3]

    class P:
        def __init__(self, x, y):
            self.x, self.y = x, y

    class Shape:
        def parts(self):
            return [P(i, i) for i in range(68)]

    small, big = R(0, 0, 10, 10), R(0, 0, 30, 30)
    det = type("D", (), {"run": lambda self, img, up, thr: ([small, big], [0.5, 0.5], [0, 0])})()
    monkeypatch.setattr(faces, "_dlib_models", lambda: (det, lambda img, r: Shape()))
    got = faces.detect(astronaut)
    assert [f.box for f in got] == [big.box, small.box]


# -- crop parameters, crop, alignment ---------------------------------------------------------------

def test_crop_params_are_the_formula(astronaut, found):
    for f in found:
        assert tuple(faces.crop_params(astronaut.shape, f)) == ref_crop_params(astronaut.shape, f.landmarks)


def test_crop_params_sizes(astronaut, found):
    p = faces.crop_params(astronaut.shape, found[0])
    h, w = p.size
    assert h % 8 == 0 and w % 8 == 0 and 0 < h <= 512 and 0 < w <= 512
    lm = found[0].landmarks * p.scale
    assert np.mean(lm[42:48, 0]) - np.mean(lm[36:42, 0]) == pytest.approx(64.0)


def test_crop_is_resize_then_slice(astronaut, found):
    H, W, top, bottom, left, right, _ = ref_crop_params(astronaut.shape, found[0].landmarks)
    want = cv2.resize(astronaut, (W, H))[top:bottom, left:right]
    got = faces.crop(astronaut, faces.crop_params(astronaut.shape, found[0]))
    np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="session")
def face_crop(astronaut, found):
    p = faces.crop_params(astronaut.shape, found[0])
    x1 = faces.crop(astronaut, p)
    return p, x1, faces.crop_landmarks(x1, p, found[0])


def test_align_on_the_crop_is_the_formula(face_crop):
    _, x1, lm = face_crop
    want = ref_align(x1, lm)
    got = faces.align(x1, lm)
    assert got.shape == (256, 256, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_align_on_the_frame_is_the_formula(astronaut, found):
    """The whole 512 photo: another shrink/crop/pad path than the crop."""
    for f in found:
        np.testing.assert_array_equal(faces.align(astronaut, f), ref_align(astronaut, f.landmarks))


def test_align_shrinks_large_faces(astronaut, found):
    """A face 4x bigger takes the shrink branch (q / 256 / 2 >= 2)."""
    big = cv2.resize(astronaut, (2048, 2048), interpolation=cv2.INTER_CUBIC)
    lm = found[0].landmarks * 4
    np.testing.assert_array_equal(faces.align(big, lm), ref_align(big, lm))


def test_crop_redetection_keeps_the_chosen_face(face_crop, found):
    p, x1, lm = face_crop
    mapped = found[0].landmarks * p.scale - [p.left, p.top]
    eyes = lambda q: (q[36:42].mean(0) + q[42:48].mean(0)) / 2  # noqa: E731
    assert np.hypot(*(eyes(lm) - eyes(mapped))) < 4.0


def test_five_points_give_the_68_point_results(astronaut, found):
    lm = found[0].landmarks
    five = np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])
    np.testing.assert_array_equal(faces.five_points(found[0]), five)
    assert faces.crop_params(astronaut.shape, five) == faces.crop_params(astronaut.shape, lm)
    np.testing.assert_array_equal(faces.align(astronaut, five), faces.align(astronaut, lm))


@pytest.mark.parametrize("points,msg", [
    (np.zeros((4, 2)), "68 or 5"),
    (np.full((5, 2), np.nan), "finite"),
    ([["a", "b"]] * 5, "list of"),
    (np.full((5, 2), 600.0), "outside"),
])
def test_bad_points(points, msg):
    with pytest.raises(SgexError, match=msg):
        faces.check_points(points, image_shape=(512, 512, 3))


# -- paste-back and tracking ------------------------------------------------------------------------

def test_feather_mask():
    m = faces.feather_mask(64, 32)[:, :, 0]
    ramp = faces.FEATHER * 32
    assert m.shape == (64, 32) and m.max() == 1.0
    assert m[32, 16] == 1.0 and m[0, 16] == pytest.approx(0.5 / ramp)
    hard = faces.feather_mask(64, 32, edges=(False, True, True, True))[:, :, 0]
    assert hard[0, 16] == 1.0 and hard[-1, 16] == pytest.approx(0.5 / ramp)


def test_paste_back_touches_only_the_box(astronaut, found):
    p = faces.crop_params(astronaut.shape, found[0])
    canvas = faces.paste_canvas(astronaut, p)
    assert canvas.shape == (4 * p.h, 4 * p.w, 3)
    want = cv2.resize(astronaut, (4 * p.w, 4 * p.h), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(canvas, want)
    box = faces.paste_box(p, astronaut.shape, canvas.shape)
    assert box == (4 * p.top, 4 * p.bottom, 4 * p.left, 4 * p.right)
    t, b, le, r = box
    face_out = np.random.default_rng(0).integers(0, 256, (b - t, r - le, 3), dtype=np.uint8)
    out = faces.paste_back(canvas.copy(), face_out, box)
    inside = np.zeros(out.shape[:2], bool)
    inside[t:b, le:r] = True
    np.testing.assert_array_equal(out[~inside], want[~inside])
    # inside: the feathered blend of every pixel (the top edge is on the frame border: hard)
    m = faces.feather_mask(b - t, r - le, edges=(t > 0, b < canvas.shape[0], le > 0, r < canvas.shape[1]))
    src = want[t:b, le:r].astype(np.float32)
    blend = np.clip(np.rint(src + (face_out.astype(np.float32) - src) * m), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out[t:b, le:r], blend)
    assert t == 0 and (out[0, le + (r - le) // 2] == face_out[0, (r - le) // 2]).all()


def test_tracker_follows_and_keeps_size(astronaut, found):
    p0 = faces.crop_params(astronaut.shape, found[0])
    tr = faces.CropTracker(p0, found[0], alpha=1.0)
    moved = faces.Face(found[0].box, found[0].score, found[0].landmarks + [40.0, 0.0])
    p1 = tr.update([moved, found[1]])
    assert p1.size == p0.size and p1.scale == p0.scale
    assert p1.left - p0.left == pytest.approx(40 * p0.scale, abs=8)
    assert tr.update([]) == p1 and tr.missed == 1

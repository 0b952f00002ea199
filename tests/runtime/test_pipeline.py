"""The face pipeline through `Engine` and sgex-run on the public-domain astronaut photo (tiny random
checkpoints at width_div 4, torch backend): the output is 4x the official crop, paste-back gives
the whole frame, several faces go through the engine one call per distinct crop size, user
landmarks (5 or 68 points) give the detection's result, videos keep the first frame's crop or
follow the face, and every refusal is one line with nothing written.

Speed: the official crop of the full photo is up to 512x512 (an output of 2048, ~20 s a call
here), so the library tests use a smaller crop (FaceOptions.padding) and the CLI tests a
144x144 window of the photo around the face, whose official crop is clipped by the border."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("dlib")
pytest.importorskip("PIL")
pytest.importorskip("scipy")
pytest.importorskip("torch")

from runtime import faces as F  # noqa: E402
from runtime import io as rio  # noqa: E402
from runtime import pipeline  # noqa: E402
from runtime.cli import main  # noqa: E402
from runtime.errors import SgexError  # noqa: E402
from runtime.pipeline import FaceOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMALL = (64, 64, 64, 64)  # crop half-sizes for fast library tests (the official is 256)
WINDOW = (50, 148, 144)  # top, left, side of the CLI test window around the face


def ref_params(shape, lm, pad):
    """get_video_crop_parameter from spec 4.0, written here (see test_faces.py)."""
    s = 64.0 / (np.mean(lm[42:48, 0]) - np.mean(lm[36:42, 0]))
    c = (np.mean(lm[36:42], axis=0) + np.mean(lm[42:48], axis=0)) / 2 * s
    H, W = round(shape[0] * s), round(shape[1] * s)
    return (H, W, max(round(c[1] - pad[2]), 0) // 8 * 8, min(round(c[1] + pad[3]), H) // 8 * 8,
            max(round(c[0] - pad[0]), 0) // 8 * 8, min(round(c[0] + pad[1]), W) // 8 * 8, s)


@pytest.fixture(scope="module")
def engine(tiny_ckpt, one_thread):
    from runtime.engine import Engine

    return Engine.from_checkpoint("superres", ckpt=tiny_ckpt("superres"))


@pytest.fixture(scope="module")
def toon(tiny_ckpt, one_thread):
    from runtime.engine import Engine

    return Engine.from_checkpoint("toonify", ckpt=tiny_ckpt("toonify"))


def count_synth(monkeypatch, engine) -> list:
    calls = []
    real = engine.synthesize

    def spy(x1, *a, **k):
        calls.append(x1.shape)
        return real(x1, *a, **k)

    monkeypatch.setattr(engine, "synthesize", spy)
    return calls


# -- library -----------------------------------------------------------------------------------------

def test_photo_best_face(engine, astronaut, found):
    res = engine.process_photo(astronaut, FaceOptions(padding=SMALL))
    job = res.faces[0].job
    want = ref_params(astronaut.shape, found[0].landmarks, SMALL)
    assert tuple(job.params) == want and len(res.faces) == 1
    h, w = job.params.size
    assert res.image.shape == (4 * h, 4 * w, 3)
    # the pipeline adds nothing to the model: x1 = the official crop, x2 = its alignment
    x1 = cv2.resize(astronaut, (want[1], want[0]))[want[2]:want[3], want[4]:want[5]]
    np.testing.assert_array_equal(job.x1, x1)
    np.testing.assert_array_equal(res.image, engine.process(x1, x2=job.x2))
    assert set(res.timings) == set(pipeline.STAGES)


def test_all_faces_one_call_per_crop_size(engine, astronaut, found, monkeypatch):
    calls = count_synth(monkeypatch, engine)
    res = engine.process_photo(astronaut, FaceOptions(faces="all", padding=SMALL))
    assert [f.job.score for f in res.faces] == [f.score for f in found]  # the face, then the patch
    sizes = {f.job.params.size for f in res.faces}
    assert len(calls) == len(sizes)
    assert sum(c[0] for c in calls) == len(found) == 2
    for f in res.faces:
        assert f.output.shape[:2] == tuple(4 * s for s in f.job.params.size)


def test_distinct_sizes_are_separate_calls(engine, astronaut, found, monkeypatch):
    """Landmarks near the border give a clipped (smaller) crop: two sizes, two calls."""
    lm = found[0].landmarks
    eye_mid_x = (lm[36:42, 0].mean() + lm[42:48, 0].mean()) / 2
    near_edge = lm - [eye_mid_x - 20, 0]  # eyes 20 px from the left border: the crop is cut there
    calls = count_synth(monkeypatch, engine)
    res = engine.process_photo(astronaut, FaceOptions(faces="all", padding=SMALL,
                                                      landmarks=(found[0].landmarks, near_edge)))
    sizes = [f.job.params.size for f in res.faces]
    assert sizes[0] != sizes[1] and sorted(c[1:3] for c in calls) == sorted(sizes)


def test_paste_back_whole_frame(engine, astronaut, found):
    res = engine.process_photo(astronaut, FaceOptions(faces="all", paste_back=True, padding=SMALL))
    p = res.faces[0].job.params
    assert res.image.shape == (4 * p.h, 4 * p.w, 3)
    canvas = cv2.resize(astronaut, (4 * p.w, 4 * p.h), interpolation=cv2.INTER_CUBIC)
    touched = np.zeros(res.image.shape[:2], bool)
    for f in res.faces:
        t, b, le, r = F.paste_box(f.job.params, astronaut.shape, res.image.shape)
        touched[t:b, le:r] = True
    np.testing.assert_array_equal(res.image[~touched], canvas[~touched])
    t, b, le, r = (4 * v for v in (p.top, p.bottom, p.left, p.right))
    m = int(np.ceil(F.FEATHER * min(b - t, r - le)))  # inside the feather ramp: the face output itself
    np.testing.assert_array_equal(res.image[t + m:b - m, le + m:r - m], res.faces[0].output[m:-m, m:-m])


def test_no_face_and_too_many(engine, astronaut):
    blank = np.full((96, 96, 3), 128, np.uint8)
    with pytest.raises(SgexError, match=r"^no face found in input; pass --no-align to process the whole image$"):
        engine.process_photo(blank)
    with pytest.raises(SgexError, match="--faces 3: only 2 faces found"):
        pipeline.find_faces(astronaut, FaceOptions(faces=3), "x")


def test_superres_scale_resizes_with_pil_first(engine, astronaut):
    small = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    res = engine.process_photo(small, FaceOptions(padding=SMALL), scale=8)
    from PIL import Image

    frame = np.asarray(Image.fromarray(small).resize((512, 512), Image.BICUBIC))
    lm = F.detect(frame)[0].landmarks
    assert tuple(res.faces[0].job.params) == ref_params(frame.shape, lm, SMALL)


# -- video -------------------------------------------------------------------------------------------

def shifted_frames(astronaut, n=4, step=3):
    """The CLI window of the photo moved right by `step` px per frame: the face moves left."""
    top, left, side = WINDOW
    return [np.ascontiguousarray(astronaut[top:top + side, left + k * step:left + k * step + side]) for k in range(n)]


def record_crops(monkeypatch) -> list:
    seen = []
    real = F.crop

    def spy(rgb, params):
        seen.append(params)
        return real(rgb, params)

    monkeypatch.setattr(F, "crop", spy)
    return seen


@pytest.mark.parametrize("track", [False, True])
def test_video_first_frame_crop_or_track(toon, astronaut, monkeypatch, track):
    frames = shifted_frames(astronaut)
    seen = record_crops(monkeypatch)
    out = list(toon.process_video(frames, faces=FaceOptions(track=track, padding=SMALL)))
    assert len(out) == len(frames)
    per_frame = seen[1:]  # seen[0] is the first frame's crop for x2
    assert len(per_frame) == len(frames)
    assert len({p.size for p in per_frame}) == 1 and len({o.shape for o in out}) == 1
    lefts = [p.left for p in per_frame]
    if not track:
        assert len(set(per_frame)) == 1  # the official recipe: the first frame's params for every frame
    else:
        assert lefts == sorted(lefts, reverse=True) and lefts[0] > lefts[-1]  # follows the face left


# -- sgex-run ----------------------------------------------------------------------------------------

def sgex_run(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", "import sys; from runtime.cli import main; sys.exit(main())", *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def window_png(astronaut, tmp_path_factory):
    top, left, side = WINDOW
    img = astronaut[top:top + side, left:left + side]
    path = tmp_path_factory.mktemp("photo") / "astro.png"
    rio.write_image(path, img)
    return path, img, F.detect(img)


def test_cli_output_is_4x_the_official_crop(tmp_path, tiny_ckpt, window_png):
    path, img, found = window_png
    out = tmp_path / "o.png"
    assert main(["--task", "superres", "--ckpt", tiny_ckpt("superres"), "--input", str(path),
                 "--output", str(out)]) == 0
    H, W, top, bottom, left, right, _ = ref_params(img.shape, found[0].landmarks, (256,) * 4)
    assert rio.read_image(out).shape == (4 * (bottom - top), 4 * (right - left), 3)

    # --landmarks with 68 and with 5 points: the crop of detection, and 5 points give the 68's pixels
    lm = found[0].landmarks
    five = np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])
    for name, pts in (("68", lm), ("5", five)):
        (tmp_path / f"{name}.json").write_text(json.dumps(pts.tolist()))
        o = tmp_path / f"o{name}.png"
        assert main(["--task", "superres", "--ckpt", tiny_ckpt("superres"), "--input", str(path),
                     "--output", str(o), "--landmarks", str(tmp_path / f"{name}.json")]) == 0
        assert rio.read_image(o).shape == rio.read_image(out).shape
    np.testing.assert_array_equal(rio.read_image(tmp_path / "o5.png"), rio.read_image(tmp_path / "o68.png"))


def test_user_landmarks_give_the_detection_crop(astronaut, found, monkeypatch):
    """5 or 68 user points: the same params and x1 as dlib's face, and dlib is not run at all."""
    _, want = pipeline.prepare(astronaut, "superres", FaceOptions(), selected=found[:1])
    monkeypatch.setattr(F, "detect", lambda *a, **k: pytest.fail("dlib ran on user landmarks"))
    lm = found[0].landmarks
    for pts in (lm, F.five_points(lm)):
        _, (job,) = pipeline.prepare(astronaut, "superres", FaceOptions(landmarks=(pts,)))
        assert job.params == want[0].params
        np.testing.assert_array_equal(job.x1, want[0].x1)


def test_cli_paste_back_full_frame(tmp_path, tiny_ckpt, window_png):
    path, img, found = window_png
    out = tmp_path / "p.png"
    assert main(["--task", "superres", "--ckpt", tiny_ckpt("superres"), "--input", str(path),
                 "--output", str(out), "--paste-back"]) == 0
    H, W = ref_params(img.shape, found[0].landmarks, (256,) * 4)[:2]
    assert rio.read_image(out).shape == (4 * H, 4 * W, 3)


def test_cli_video_track_keeps_frames_and_fps(tmp_path, tiny_ckpt, astronaut):
    frames = shifted_frames(astronaut)
    src = tmp_path / "clip.mp4"
    vw = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"mp4v"), 12.0, frames[0].shape[1::-1])
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()
    out = tmp_path / "out.mp4"
    assert main(["--task", "toonify", "--ckpt", tiny_ckpt("toonify"), "--input", str(src), "--output", str(out),
                 "--track", "--paste-back"]) == 0
    cap = cv2.VideoCapture(str(out))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == len(frames) and cap.get(cv2.CAP_PROP_FPS) == 12.0
    first = cv2.cvtColor(cv2.VideoCapture(str(src)).read()[1], cv2.COLOR_BGR2RGB)
    p = F.crop_params(first.shape, F.detect(first)[0])
    assert (cap.get(cv2.CAP_PROP_FRAME_HEIGHT), cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == (4 * p.h, 4 * p.w)


def _refusal(tmp_path, window_png, case):
    path, img, found = window_png
    base = ["--task", "superres", "--random-weights", "--width-div", "4", "--output", str(tmp_path / "o.png")]
    if case == "no_face":
        blank = tmp_path / "blank.png"
        rio.write_image(blank, np.full((96, 96, 3), 128, np.uint8))
        return base + ["--input", str(blank)], f"no face found in {blank}; pass --no-align to process the whole image"
    if case == "three_faces":
        return base + ["--input", str(path), "--faces", "3"], "--faces 3: only 1 face found"
    if case == "bad_faces_value":
        return base + ["--input", str(path), "--faces", "most"], "--faces must be best, all or a count"
    if case == "malformed_landmarks":
        (tmp_path / "l.json").write_text("[[1, 2], [3")
        return base + ["--input", str(path), "--landmarks", str(tmp_path / "l.json")], "not a JSON landmarks file"
    if case == "landmarks_count":
        (tmp_path / "l.json").write_text(json.dumps([[1, 2]] * 7))
        return base + ["--input", str(path), "--landmarks", str(tmp_path / "l.json")], "68 or 5"
    if case == "landmarks_outside":
        (tmp_path / "l.json").write_text(json.dumps([[10, 10]] * 4 + [[500, 10]]))
        return base + ["--input", str(path), "--landmarks", str(tmp_path / "l.json")], "outside the 144x144 image"
    if case == "track_on_image":
        return base + ["--input", str(path), "--track"], "--track applies to video inputs only"
    if case == "no_align_with_faces":
        return base + ["--input", str(path), "--no-align", "--paste-back"], "does not go with --no-align"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no_face", "three_faces", "bad_faces_value", "malformed_landmarks",
                                  "landmarks_count", "landmarks_outside", "track_on_image", "no_align_with_faces"])
def test_cli_refusals_one_line_nothing_written(tmp_path, window_png, case):
    argv, msg = _refusal(tmp_path, window_png, case)
    before = sorted(tmp_path.iterdir())
    r = sgex_run(*argv)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stderr
    assert lines[0].startswith("sgex-run: error: ")
    assert sorted(tmp_path.iterdir()) == before
    assert "random weights" not in r.stderr  # refused before a model was built


@pytest.mark.slow
def test_cli_full_photo_all_faces(tmp_path, tiny_ckpt):
    """The full 512x512 photo at the official crop: both boxes, one output each (~1 min here)."""
    out = tmp_path / "o.png"
    assert main(["--task", "superres", "--ckpt", tiny_ckpt("superres"), "--input", str(ROOT / "examples" / "astronaut.png"),
                 "--output", str(out), "--faces", "all"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o_face0.png", "o_face1.png"]


def test_track_frame_without_face_keeps_the_last_crop(toon, astronaut, monkeypatch, caplog):
    frames = shifted_frames(astronaut, n=3)
    frames.insert(2, np.full_like(frames[0], 128))  # no face in frame 2
    seen = record_crops(monkeypatch)
    with caplog.at_level("INFO"):
        out = list(toon.process_video(frames, faces=FaceOptions(track=True, padding=SMALL)))
    assert len(out) == 4
    per_frame = seen[1:]
    assert per_frame[2] == per_frame[1]
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("without a face keeps the last crop" in m for m in msgs) == 1  # said once
    assert any("1 of 4 frames had no face" in m for m in msgs)  # and counted at the end

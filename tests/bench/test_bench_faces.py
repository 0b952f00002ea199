"""sgex-bench --faces-photo: the face stages (detect, crop/align, paste-back) are timed per frame
on the astronaut photo and reported beside the model time, in the JSON and the table. No
assertion on the timings themselves (shared CI machines), only that every stage was measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import cli as bench

pytest.importorskip("dlib")
pytest.importorskip("PIL")
pytest.importorskip("scipy")

PHOTO = Path(__file__).resolve().parents[2] / "examples" / "astronaut.png"


def test_face_stages_reported(tmp_path, capsys):
    js = tmp_path / "r.json"
    rc = bench.main(["--task", "superres", "--res", "32", "--backends", "torch", "--random-weights",
                     "--width-div", "4", "--iters", "1", "--warmup", "0", "--faces-photo", str(PHOTO),
                     "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    faces = json.loads(js.read_text())["faces"]
    assert faces["frame"] == [512, 512] and faces["crop"] == [408, 512]
    assert faces["output_frame"] == [4 * 756, 4 * 756]
    for stage in ("detect", "crop_align", "crop", "paste_back"):
        st = faces["stages"][stage]
        assert st["n"] == 1 and st["min_ms"] > 0
    assert "face stages per frame" in out and "paste-back" in out


def test_face_photo_missing(tmp_path, capsys):
    rc = bench.main(["--task", "superres", "--res", "32", "--random-weights", "--faces-photo",
                     str(tmp_path / "nope.png")])
    assert rc == 2 and "--faces-photo" in capsys.readouterr().err

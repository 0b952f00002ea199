"""sgex-run end to end: every bad input exits non-zero with one line on stderr and writes nothing
(run as a subprocess, so stderr is exactly what a user sees); images, folders and videos through
the torch backend on a tiny checkpoint; ONNX Runtime artifacts give the torch backend's pixels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime import io as rio
from runtime.cli import main

ROOT = Path(__file__).resolve().parents[2]


def sgex_run(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", "import sys; from runtime.cli import main; sys.exit(main())", *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def png(path, shape, seed=0):
    img = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def mp4(path, frames=3, fps=10.0, size=(32, 24)):
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(frames):
        vw.write(np.full((size[1], size[0], 3), 30 * i + 20, np.uint8))
    vw.release()
    return path


def _bad_case(case: str, d: Path) -> tuple[list[str], Path]:
    """(argv, output path) for one bad invocation; validation must fail before any model loads."""
    torch_sr = ["--task", "superres", "--backend", "torch", "--random-weights"]
    ok_in = png(d / "in.png", (16, 16, 3))
    out = d / "out.png"
    if case == "missing_input":
        return torch_sr + ["--input", str(d / "nope.png"), "--output", str(out)], out
    if case == "not_an_image":
        (d / "t.png").write_text("hello")
        return torch_sr + ["--input", str(d / "t.png"), "--output", str(out)], out
    if case == "empty_file":
        (d / "e.png").write_bytes(b"")
        return torch_sr + ["--input", str(d / "e.png"), "--output", str(out)], out
    if case == "grey_for_rgb_task":
        return torch_sr + ["--input", str(png(d / "g.png", (16, 16))), "--output", str(out)], out
    if case == "rgb_for_mask_task":
        return ["--task", "mask2face", "--backend", "torch", "--random-weights",
                "--input", str(ok_in), "--output", str(out)], out
    if case == "unwritable_output":
        return torch_sr + ["--input", str(ok_in), "--output", "/proc/sgex-run-test.png"], Path("/proc/sgex-run-test.png")
    if case == "output_is_a_directory":
        (d / "odir").mkdir()
        return torch_sr + ["--input", str(ok_in), "--output", str(d / "odir")], d / "odir" / "in.png"
    if case == "output_dir_missing":
        return torch_sr + ["--input", str(ok_in), "--output", str(d / "no" / "out.png")], d / "no" / "out.png"
    if case == "not_an_image_output":
        return torch_sr + ["--input", str(ok_in), "--output", str(d / "out.txt")], d / "out.txt"
    if case == "video_no_frames":
        cv2.VideoWriter(str(d / "v.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (32, 32)).release()
        return torch_sr + ["--input", str(d / "v.mp4"), "--output", str(d / "o.mp4")], d / "o.mp4"
    if case == "video_junk":
        (d / "v.mp4").write_bytes(b"junk" * 100)
        return torch_sr + ["--input", str(d / "v.mp4"), "--output", str(d / "o.mp4")], d / "o.mp4"
    if case == "video_to_image":
        return torch_sr + ["--input", str(mp4(d / "v.mp4")), "--output", str(out)], out
    if case == "empty_folder":
        (d / "f").mkdir()
        return torch_sr + ["--input", str(d / "f"), "--output", str(d / "of")], d / "of"
    if case == "folder_with_bad_image":
        (d / "f").mkdir()
        png(d / "f" / "a.png", (16, 16, 3))
        png(d / "f" / "b.png", (16, 16))
        return torch_sr + ["--input", str(d / "f"), "--output", str(d / "of")], d / "of"
    if case == "x2_wrong_size":
        return torch_sr + ["--input", str(ok_in), "--output", str(out), "--x2", str(png(d / "x2.png", (128, 256, 3)))], out
    if case == "torch_without_checkpoint":
        return ["--task", "superres", "--backend", "torch", "--input", str(ok_in), "--output", str(out)], out
    if case == "ort_without_artifacts":
        return ["--task", "superres", "--backend", "ort", "--input", str(ok_in), "--output", str(out)], out
    if case == "scale_for_toonify":
        return ["--task", "toonify", "--random-weights", "--scale", "8", "--input", str(ok_in), "--output", str(out)], out
    if case == "simulate_lr_for_toonify":
        return ["--task", "toonify", "--random-weights", "--simulate-lr", "--input", str(ok_in), "--output", str(out)], out
    if case == "simulate_lr_without_no_align":
        return torch_sr + ["--simulate-lr", "--input", str(ok_in), "--output", str(out)], out
    if case == "missing_artifacts_dir":
        return ["--task", "superres", "--artifacts", str(d / "nowhere"), "--input", str(ok_in), "--output", str(out)], out
    raise AssertionError(case)


BAD_CASES = ["missing_input", "not_an_image", "empty_file", "grey_for_rgb_task", "rgb_for_mask_task",
             "unwritable_output", "output_is_a_directory", "output_dir_missing", "not_an_image_output",
             "video_no_frames", "video_junk", "video_to_image", "empty_folder", "folder_with_bad_image",
             "x2_wrong_size", "torch_without_checkpoint", "ort_without_artifacts", "scale_for_toonify",
             "simulate_lr_for_toonify", "simulate_lr_without_no_align", "missing_artifacts_dir"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_no_output(tmp_path, case):
    argv, out = _bad_case(case, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = sgex_run(*argv)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("sgex-run: error: "), r.stderr
    assert not out.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no temp files either


def test_checkpoint_of_another_task(tmp_path, tiny_ckpt):
    r = sgex_run("--task", "toonify", "--ckpt", tiny_ckpt("superres"), "--no-align", "--input", str(png(tmp_path / "a.png", (16, 16, 3))),
                 "--output", str(tmp_path / "o.png"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "superres" in r.stderr, r.stderr
    assert not (tmp_path / "o.png").exists()


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for s in ("examples:", "--scale", "PIL bicubic", "centre square", "-scale", "--random-weights",
              "--simulate-lr", "multiples of 8", "padded bottom/right to the next multiple of 8"):
        assert s in text


# -- successful runs (torch backend in this process, tiny checkpoints) ------------------------------

def test_image_superres_scale(tmp_path, tiny_ckpt):
    src = png(tmp_path / "lr.png", (12, 10, 3))
    assert main(["--task", "superres", "--ckpt", tiny_ckpt("superres"), "--input", str(src),
                 "--output", str(tmp_path / "sr.png"), "--scale", "8", "--device", "cpu", "--no-align"]) == 0
    assert rio.read_image(tmp_path / "sr.png").shape == (96, 80, 3)  # 8 x the input


def test_folder(tmp_path, tiny_ckpt):
    (tmp_path / "in").mkdir()
    png(tmp_path / "in" / "a.png", (16, 20, 3), 1)
    png(tmp_path / "in" / "b.jpg", (24, 16, 3), 2)
    assert main(["--task", "superres", "--backend", "torch", "--ckpt", tiny_ckpt("superres"), "--scale", "4",
                 "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--no-align"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.jpg"]
    assert rio.read_image(tmp_path / "out" / "b.jpg").shape == (96, 64, 3)


def test_video_round_trip(tmp_path, tiny_ckpt):
    src = mp4(tmp_path / "clip.mp4", frames=3, fps=10.0, size=(32, 24))
    out = tmp_path / "clip_out.mp4"
    assert main(["--task", "superres", "--ckpt", tiny_ckpt("superres"), "--scale", "4", "--no-align",
                 "--input", str(src), "--output", str(out)]) == 0
    cap = cv2.VideoCapture(str(out))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 3 and cap.get(cv2.CAP_PROP_FPS) == 10.0
    assert (cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (128, 96)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "clip_out.mp4"]


def test_random_weights_notice(tmp_path, caplog):
    pytest.importorskip("torch")
    src = png(tmp_path / "s.png", (16, 16))
    assert main(["--task", "sketch2face", "--random-weights", "--width-div", "4",
                 "--input", str(src), "--output", str(tmp_path / "o.png")]) == 0
    assert any("noise" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert rio.read_image(tmp_path / "o.png").shape == (64, 64, 3)


def test_ort_cli_matches_torch_cli(tmp_path, tiny_superres_export, tiny_ckpt):
    art = tiny_superres_export  # superres, bucket 1024
    src = png(tmp_path / "in.png", (6, 7, 3), 3)
    common = ["--task", "superres", "--input", str(src), "--scale", "16", "--seed", "4", "--no-align"]  # x1 24x28
    assert main(common + ["--artifacts", str(art.parent), "--output", str(tmp_path / "ort.png")]) == 0
    assert main(common + ["--ckpt", tiny_ckpt("superres"), "--output", str(tmp_path / "pt.png")]) == 0
    a, b = rio.read_image(tmp_path / "ort.png"), rio.read_image(tmp_path / "pt.png")
    assert a.shape == (96, 112, 3)
    # the CLI adds nothing to the engine: same pixels as Engine(ort).process on x1 = 4x PIL bicubic input
    from runtime.engine import Engine

    x1 = rio.resize_for_scale(rio.read_image(src), 16)
    np.testing.assert_array_equal(a, Engine(art, backend="ort").process(x1, seed=4))
    # ort vs torch through the whole CLI (tight float bounds: test_engine.py). The tiny random
    # checkpoint's w+ is ~1e3, which turns float32 noise into a few pixel levels at a few pixels.
    assert (a != b).mean() < 5e-3
    r = sgex_run("--task", "toonify", "--artifacts", str(art), "--no-align", "--input", str(src), "--output", str(tmp_path / "x.png"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not 'toonify'" in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists()


def test_bucket_1024_gives_1024_from_256_and_refuses_264(tmp_path, tiny_superres_export):
    """`sgex-export --task superres --res 1024` (the tiny_superres_export fixture): x1 256x256 ->
    1024x1024; x1 264x264 is refused with one line naming the bucket that would hold it."""
    art = tiny_superres_export
    ok = png(tmp_path / "x256.png", (256, 256, 3), 5)
    assert main(["--task", "superres", "--artifacts", str(art), "--no-align", "--input", str(ok), "--output",
                 str(tmp_path / "o.png")]) == 0
    assert rio.read_image(tmp_path / "o.png").shape == (1024, 1024, 3)
    big = png(tmp_path / "x264.png", (264, 264, 3), 6)
    r = sgex_run("--task", "superres", "--artifacts", str(art), "--no-align", "--input", str(big), "--output",
                 str(tmp_path / "b.png"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "x1 264x264 does not fit" in lines[0] and "--res 1056" in lines[0], r.stderr
    assert not (tmp_path / "b.png").exists()


def test_simulate_lr_cli_is_the_official_demo_path(tmp_path, tiny_ckpt):
    src = png(tmp_path / "hr.png", (48, 40, 3), 7)
    out = tmp_path / "sr.png"
    assert main(["--task", "superres", "--ckpt", tiny_ckpt("superres"), "--input", str(src), "--output", str(out),
                 "--no-align", "--simulate-lr", "--scale", "16", "--seed", "2"]) == 0
    from runtime.engine import Engine

    x1, lr = rio.simulate_lr(rio.read_image(src), 16)
    assert lr.shape == (12, 10, 3) and x1.shape == (48, 40, 3)
    eng = Engine.from_checkpoint("superres", ckpt=tiny_ckpt("superres"))
    np.testing.assert_array_equal(rio.read_image(out), eng.process(x1, seed=2))

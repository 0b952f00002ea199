"""sgex-export CLI: --help without heavy imports, one-line user errors with nothing written.
A successful export through main() is test_onnx.py::test_cli_export_success (it shares that
module's session artifacts, so the export runs once)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from export.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _py(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_help_without_torch():
    code = ("import sys; from export.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'onnxscript') if m in sys.modules]\n"
            "assert not heavy, heavy")
    r = _py(code)
    assert r.returncode == 0, r.stderr
    assert "examples:" in r.stdout and "sgex-export --task superres" in r.stdout
    assert "--precision" in r.stdout and "--flavor" in r.stdout


def _run_cli(capsys, args):
    rc = main(args)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("args, match", [
    (["--task", "superres", "--res", "100", "--random-weights"], "--res is the output side: a multiple of 32"),
    (["--task", "superres", "--res", "0", "--random-weights"], "multiple of 32"),
    (["--task", "superres", "--res", "16", "--random-weights"], "at least 32"),
    (["--task", "colorize", "--res", "64", "--random-weights"], "unknown task 'colorize'"),
    (["--task", "superres", "--res", "64"], "--ckpt FILE"),
    (["--task", "superres", "--res", "64", "--random-weights", "--plan", "p.json"], "--plan only applies"),
    (["--task", "superres", "--res", "64", "--random-weights", "--precision", "fp16", "--plan", "nope.json"],
     "does not exist"),
    (["--task", "superres", "--res", "64", "--random-weights", "--max-batch", "0"], "--max-batch"),
    (["--task", "superres", "--res", "64", "--random-weights", "--opset", "11"], "--opset"),
    (["--task", "superres", "--res", "64", "--random-weights", "--variant", "sr64"], "no variant 'sr64'"),
])
def test_user_errors_one_line_nothing_written(tmp_path, capsys, args, match):
    out = tmp_path / "out"
    rc, lines = _run_cli(capsys, args + ["--out", str(out)])
    assert rc == 2
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and match in errors[0] and errors[0].startswith("sgex-export: error:"), lines
    assert not any("Traceback" in line for line in lines)
    assert not out.exists()


def test_usage_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--task", "superres", "--res", "abc", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "invalid int value" in lines[0]
    with pytest.raises(SystemExit):
        main(["--task", "superres", "--ckpt", "a.pt", "--random-weights"])
    assert "not allowed with" in capsys.readouterr().err


def test_wrong_task_checkpoint(tmp_path, capsys, tiny_ckpt):
    out = tmp_path / "out"
    rc, lines = _run_cli(capsys, ["--task", "toonify", "--res", "64", "--ckpt", tiny_ckpt("superres"),
                                  "--out", str(out)])
    assert rc == 2 and len([x for x in lines if "error" in x]) == 1
    assert "superres checkpoint" in lines[-1] and "not toonify" in lines[-1]
    assert not out.exists()


def test_not_a_checkpoint(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    bad.write_text("hello")
    rc, lines = _run_cli(capsys, ["--task", "superres", "--res", "64", "--ckpt", str(bad), "--out",
                                  str(tmp_path / "out")])
    assert rc == 2 and "not a PyTorch checkpoint" in lines[-1]
    assert not (tmp_path / "out").exists()


def test_existing_out_dir_untouched_on_error(tmp_path, capsys, tiny_ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, _ = _run_cli(capsys, ["--task", "toonify", "--res", "64", "--ckpt", tiny_ckpt("superres"),
                              "--out", str(out)])
    assert rc == 2 and sorted(p.name for p in out.iterdir()) == ["keep.txt"]

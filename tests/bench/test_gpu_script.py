"""bench/gpu/run.sh --cpu-smoke: every step of the GPU script runs at tiny sizes on CPU (the Triton
kernel interpreted) and the report is complete, so the script is known to work before a GPU is
lent. No timing is asserted. A bad command line is one line on stderr and exit 2."""

from __future__ import annotations

import csv
import json
import os
import sys
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu" / "run.sh"


def _env():
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def test_bad_command_lines(tmp_path):
    for args in ([], ["--cpu-smoke"], ["a", "b"]):
        r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=_env())
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "usage" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    r = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", str(tmp_path / "full")], capture_output=True,
                       text=True, env=_env())
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (tmp_path / "full" / "x").read_text() == "keep"


def test_cpu_smoke_runs_every_step(tmp_path):
    out = tmp_path / "gpu"
    r = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", str(out)], capture_output=True, text=True,
                       env=_env(), cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = list(csv.DictReader((out / "steps.tsv").open(), delimiter="\t"))
    names = [s["step"] for s in steps]
    assert names[:4] == ["b-kernel", "c-e2e-superres-video-b1", "d-profile", "a-pytest"]
    assert names[-1] == "e-report" and any(n.startswith("c-e2e-") for n in names)
    failed = [(s["step"], s["status"]) for s in steps if s["status"] != "ok"]
    assert not failed, (failed, {n: (out / "logs" / f"{n}.log").read_text()[-1500:] for n, _ in failed})
    kernel = json.loads((out / "kernel.json").read_text())
    assert kernel["interpreted"] and kernel["results"]
    for row in kernel["results"]:
        assert row["impls"]["triton"]["max_abs_err_vs_fp32_reference"] < 0.05
    e2e = [json.loads(p.read_text()) for p in out.glob("e2e-*.json")]
    assert {(r["config"]["task"], r["config"]["mode"]) for r in e2e} == {("superres", "video"), ("edit", "image")}
    prof = json.loads((out / "profile.json").read_text())
    assert set(prof["groups"]) == {"encoder", "shallow", "high-res", "fusion", "other"}
    assert prof["groups"]["high-res"]["gflop"] > 0 and prof["groups"]["shallow"]["time_ms"] > 0
    readme = (out / "README.md").read_text()
    assert "CPU SMOKE RUN" in readme and "| superres | video | 1 |" in readme
    assert "bash bench/gpu/run.sh --cpu-smoke OUTDIR" in readme and "-m bench.gpu.profile" in readme
    tests = json.loads((out / "logs" / "gpu_tests.json").read_text())
    assert tests["kernel"] and tests["fp16_vs_fp32"]

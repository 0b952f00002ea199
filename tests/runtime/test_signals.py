"""SIGTERM and SIGHUP unwind a CLI like SIGINT: every context manager cleans up (the temp output of
`atomic_output` is removed, the existing output is kept) and the exit status is 128 + signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BODY = r"""
import sys, time
from pathlib import Path
from runtime._cli import run_main
from runtime.io import atomic_output

out = Path(sys.argv[1])

def body():
    with atomic_output(out) as tmp:
        tmp.write_bytes(b"partial")
        print("ready", flush=True)
        time.sleep(60)
    return 0

sys.exit(run_main("prog", body))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_removes_temp_and_keeps_existing_output(tmp_path, sig):
    out = tmp_path / "result.png"
    out.write_bytes(b"old result")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", BODY, str(out)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert len(list(tmp_path.iterdir())) == 2  # the temp file exists while the body runs
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["result.png"]
    assert out.read_bytes() == b"old result"


def test_handlers_restored_after_run_main():
    from runtime._cli import run_main

    before = signal.getsignal(signal.SIGTERM)
    seen = []
    assert run_main("prog", lambda: seen.append(signal.getsignal(signal.SIGTERM)) or 0) == 0
    assert seen[0] is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_repeated_signal_does_not_cut_cleanup(tmp_path):
    """A second SIGTERM while the first unwinds is ignored: the finally block completes."""
    marker = tmp_path / "cleaned"
    code = r"""
import os, signal, sys, time
from runtime._cli import run_main
def body():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        open(sys.argv[1], "w").close()
    return 0
sys.exit(run_main("prog", body))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, str(marker)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 143, r.stderr
    assert marker.exists()

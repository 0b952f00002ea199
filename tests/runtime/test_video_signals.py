"""sgex-run on a video, interrupted by SIGINT or SIGTERM in the middle of the pipeline (decode,
engine and encode threads all busy): the process exits without a traceback or a hang, the temp
output is gone and an existing output file is untouched (issue 13 item 4). SIGTERM relies on
runtime._cli turning termination signals into an exception like SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def clip(path, frames, size=(32, 32), fps=25.0):
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    rng = np.random.default_rng(0)
    for _ in range(frames):
        vw.write(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    vw.release()
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_video_leaves_nothing_and_keeps_the_old_output(tmp_path, tiny_ckpt, sig):
    pytest.importorskip("torch")
    src = clip(tmp_path / "in.mp4", frames=400)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "runtime.cli", "--task", "toonify", "--backend", "torch",
                          "--ckpt", tiny_ckpt("toonify"), "--no-align", "--batch", "2", "--input", str(src),
                          "--output", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        temp = []
        while not temp or temp[0].stat().st_size == 0:  # the encoder has written frames
            assert p.poll() is None, p.communicate()[1]
            assert time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.1)
            temp = [f for f in tmp_path.iterdir() if f.name not in ("in.mp4", "out.mp4")]
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)  # a hung worker thread would time out here
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 128 + sig, (p.returncode, err)
    assert "Traceback" not in err, err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]
    assert out.read_bytes() == b"previous result"

"""Shared test plumbing: hardware markers that skip themselves, and cached tiny checkpoints.

Markers (pyproject.toml): `slow` is excluded from the default run; `gpu` skips without a CUDA
device; `trt` skips without TensorRT. A machine that has them runs them with `-m gpu` / `-m trt`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Under pytest-xdist (the README's test command runs two workers on the 2-core CI machine) each
# worker keeps torch to one thread, so the two workers do not oversubscribe the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")

TINY_WIDTH_DIV = 4  # channel divisor of the fast-test model (official sizes are width_div=1)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A directory that build(dir) fills once per test session, shared by the pytest-xdist workers
    (they share the parent of their base temp directories; without xdist it is the base temp
    itself): a file lock serialises the build and a marker says it completed, so an export is
    made once, not once per worker. Tests must copy it before writing into it."""
    import shutil

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    d = root / f"shared-{name}"
    with FileLock(str(d) + ".lock"):
        if not (d / ".complete").is_file():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            build(d)
            (d / ".complete").write_text("")
    return d


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _has_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_trt = pytest.mark.skip(reason="needs TensorRT (pip install 'sgex[trt]' on a machine with an NVIDIA GPU)")
    has_cuda = has_trt = None
    for item in items:
        # Markers, not item.keywords: keywords also hold every parent node's name (a checkout
        # in a directory named "trt" would mark every test).
        if item.get_closest_marker("gpu"):
            has_cuda = _has_cuda() if has_cuda is None else has_cuda
            # SGEX_GPU_SMOKE=1 (bench/gpu/run.sh --cpu-smoke): GPU tests that support it run on CPU
            # at tiny sizes under the Triton interpreter; the others skip themselves.
            if not has_cuda and os.environ.get("SGEX_GPU_SMOKE") != "1":
                item.add_marker(skip_gpu)
        if item.get_closest_marker("trt"):
            has_trt = _has_tensorrt() if has_trt is None else has_trt
            if not has_trt:
                item.add_marker(skip_trt)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(task, variant=None, seed=0) -> path of a random official-format checkpoint at
    width_div=4, written once per session and reused."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("ckpt")

    def make(task: str, variant: str | None = None, seed: int = 0) -> str:
        key = (task, variant, seed)
        if key not in cache:
            from export.checkpoint import random_checkpoint

            path = root / f"{task}-{variant or 'default'}-{seed}.pt"
            random_checkpoint(task, seed=seed, variant=variant, width_div=TINY_WIDTH_DIV, path=str(path))
            cache[key] = str(path)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def one_thread():
    """torch with one intra-op thread for a module of many tiny ops (on the shared 2-core machine
    2 threads measured 6x slower wall time: synchronisation only). Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FP32_EXPORT_RES = 128  # bucket of fp32_export (output side; x1 up to 32)


@pytest.fixture(scope="session")
def fp32_export(tmp_path_factory, tiny_ckpt):
    """Shared by the calib, OpenVINO and benchmark tests (copy the directory before writing into it).
    fp32_export(task, latent_scale=1.0) -> task directory of an FP32 portable export at
    FP32_EXPORT_RES (also fp32_export.res) of the tiny random checkpoint (seed 0), optionally with latent_avg scaled."""
    cache: dict = {}

    def make(task: str, latent_scale: float = 1.0) -> str:
        key = (task, latent_scale)
        if key not in cache:
            def build(out: Path) -> None:
                from export.onnx import export_task

                ckpt = tiny_ckpt(task)
                if latent_scale != 1.0:
                    import torch

                    obj = torch.load(ckpt, weights_only=True)
                    obj["latent_avg"] = obj["latent_avg"] * latent_scale
                    ckpt = str(out / f"{task}-latent-x{latent_scale:g}.pt")
                    torch.save(obj, ckpt)
                export_task(task, FP32_EXPORT_RES, ckpt=ckpt, out=str(out), progress=False)

            cache[key] = str(built_once(tmp_path_factory, f"fp32-{task}-x{latent_scale:g}", build) / task)
        return cache[key]

    make.res = FP32_EXPORT_RES
    return make


@pytest.fixture(scope="session")
def tiny_superres_export(tmp_path_factory, tiny_ckpt):
    """A tiny superres export, made once per session: the export is the slow part of the runtime
    tests. One bucket, 1024 (outputs up to 1024x1024: x1 up to 256x256, multiples of 8), max batch
    2: what `sgex-export --task superres --res 1024` writes, at width_div=4 (the export traces at
    x1 64x64 whatever the bucket, so a large bucket costs no more). Returns the task directory."""
    pytest.importorskip("onnxruntime")
    from export.onnx import export_task

    root = built_once(tmp_path_factory, "tiny-export-superres-1024", lambda out: export_task(
        "superres", 1024, ckpt=tiny_ckpt("superres"), out=out, max_batch=2, progress=False))
    return root / "superres"


class _TensorRTBlocker:
    """A meta-path finder that makes tensorrt, cuda-python and Polygraphy's TensorRT backend
    unimportable, as on a machine without the trt extra (also where they are installed)."""

    PREFIXES = ("tensorrt", "cuda", "polygraphy.backend.trt")

    @classmethod
    def blocks(cls, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in cls.PREFIXES)

    def find_spec(self, name, path=None, target=None):
        if self.blocks(name):
            raise ImportError(f"No module named {name!r} (blocked by test)")
        return None


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Simulate a machine without TensorRT / cuda-python for the duration of a test."""
    import sys

    for name in list(sys.modules):
        if _TensorRTBlocker.blocks(name):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_TensorRTBlocker(), *sys.meta_path])

"""Backends behind `runtime.Engine`: "ort" (ONNX Runtime), "trt" (TensorRT engines, written by
runtime/backends/trt.py), "torch" (the PyTorch reference, built from a checkpoint).

Each backend module is imported only when chosen, so `import runtime` needs none of onnxruntime,
tensorrt or torch. Artifact backends share one constructor: `Cls(artifacts_dir, manifest, device)`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

from runtime.backends.base import Backend
from runtime.errors import SgexError

log = logging.getLogger(__name__)

ARTIFACT_BACKENDS = {"ort": ("runtime.backends.ort", "OrtBackend"),
                     "trt": ("runtime.backends.trt", "TrtBackend")}
NAMES = ("auto", "ort", "trt", "torch")

__all__ = ["Backend", "ARTIFACT_BACKENDS", "NAMES", "tensorrt_importable", "resolve", "create"]


def tensorrt_importable() -> tuple[bool, str]:
    """(True, "") when `import tensorrt` works, else (False, why)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "tensorrt is not installed"
    try:
        importlib.import_module("tensorrt")
    except Exception as e:  # the PyPI stub and broken CUDA installs fail at import
        return False, f"import tensorrt failed ({type(e).__name__}: {e})"
    return True, ""


def resolve(name: str, manifest) -> str:
    """The artifact backend for `name`; "auto" = "trt" when the manifest lists engines and
    tensorrt imports, else "ort". The choice and its reason are logged."""
    if name not in ARTIFACT_BACKENDS and name != "auto":
        raise SgexError(f"backend {name!r} does not run exported artifacts (choose from: auto, ort, trt)")
    if name != "auto":
        return name
    if not manifest.engines:
        log.info("backend auto -> ort (the manifest lists no TensorRT engines)")
        return "ort"
    ok, why = tensorrt_importable()
    if ok and not importlib.import_module("runtime.backends.trt").available():
        ok, why = False, "cuda-python (or TensorRT >= 10.9) is missing"
    if not ok:
        log.info("backend auto -> ort (the manifest has TensorRT engines but %s)", why)
        return "ort"
    log.info("backend auto -> trt (%d TensorRT engines in the manifest)", len(manifest.engines))
    return "trt"


def create(name: str, artifacts_dir, manifest, device: str | None = None, *,
           intra_op_threads: int | None = None) -> Backend:
    """Instantiate artifact backend `name` ("auto" | "ort" | "trt") for a verified task directory.
    intra_op_threads sizes ONNX Runtime's CPU pool; TensorRT runs on the GPU and has no such pool."""
    name = resolve(name, manifest)
    if name == "trt" and not manifest.engines:
        raise SgexError(f"{artifacts_dir}: the manifest lists no TensorRT engines "
                        f"(build them with sgex-export, or use --backend ort)")
    module, cls = ARTIFACT_BACKENDS[name]
    kwargs = {}
    if name == "ort":
        kwargs["intra_op_threads"] = intra_op_threads
    elif intra_op_threads is not None:
        log.info("%s backend: intra-op threads %d do not apply (it runs on the GPU)", name, intra_op_threads)
    return getattr(importlib.import_module(module), cls)(artifacts_dir, manifest, device, **kwargs)

"""Backends behind `runtime.Engine`: "ort" (ONNX Runtime), "trt" (TensorRT engines, written by
runtime/backends/trt.py), "openvino" (OpenVINO on the CPU, FP32 or gated BF16), "torch" (the
PyTorch reference, built from a checkpoint).

Each backend module is imported only when chosen, so `import runtime` needs none of onnxruntime,
tensorrt, openvino or torch. Artifact backends share one constructor: `Cls(artifacts_dir,
manifest, device, **options)` (see `create`).

"auto" order (each step logged with its reason): trt when the manifest lists engines and TensorRT
imports; else, on the CPU, openvino BF16 when OpenVINO is installed, the CPU has native BF16 and
the manifest carries a passing BF16 gate for every graph; else ort. Measured on the 2-core AVX-512
BF16 machines (issue #15, superres bucket 128): ONNX Runtime FP32 229 ms synth / 386 ms style,
OpenVINO FP32 275 / 323 ms, OpenVINO BF16 107 / 158 ms. OpenVINO FP32 does not beat ONNX
Runtime on the per-frame synth graph, so auto never picks it; BF16 is ~2.3x faster than either.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

from runtime.backends.base import Backend
from runtime.errors import SgexError
from runtime.manifest import BF16_GATE

log = logging.getLogger(__name__)

ARTIFACT_BACKENDS = {"ort": ("runtime.backends.ort", "OrtBackend"),
                     "trt": ("runtime.backends.trt", "TrtBackend"),
                     "openvino": ("runtime.backends.openvino", "OpenvinoBackend")}
NAMES = ("auto", "ort", "trt", "openvino", "torch")

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


def _on_cpu(device: str | None) -> bool:
    """True when `device` means the CPU: "cpu", or None/"auto" where ONNX Runtime has no CUDA."""
    if device == "cpu":
        return True
    if device not in (None, "auto"):
        return False
    try:
        return "CUDAExecutionProvider" not in importlib.import_module("onnxruntime").get_available_providers()
    except ImportError:
        return True


def openvino_bf16_ready(manifest) -> tuple[bool, str]:
    """(True, "") when backend openvino at precision bf16 can run this manifest un-forced."""
    if not isinstance(getattr(manifest, "data", {}).get(BF16_GATE), dict):
        return False, "the manifest has no BF16 accuracy report (sgex-calib --bf16)"
    if importlib.util.find_spec("openvino") is None:
        return False, "openvino is not installed"
    ov = importlib.import_module("runtime.backends.openvino")
    if manifest.precision != "fp32" or manifest.flavor != "portable":
        return False, f"the export is {manifest.precision}/{manifest.flavor}, not fp32/portable"
    for key in manifest.graphs:
        entry, why = ov.gate_entry(manifest, key)
        if entry is None:
            return False, why
    ok, why = ov.bf16_support(ov.import_openvino().Core())
    return ok, why


def resolve(name: str, manifest, device: str | None = None, precision: str | None = None) -> str:
    """The artifact backend for `name` (see the module doc for "auto"). The choice and its
    reason are logged. precision (openvino only) with "auto" means openvino."""
    if name not in ARTIFACT_BACKENDS and name != "auto":
        raise SgexError(f"backend {name!r} does not run exported artifacts (choose from: auto, "
                        f"{', '.join(ARTIFACT_BACKENDS)})")
    if name != "auto":
        return name
    if precision is not None:
        log.info("backend auto -> openvino (precision %s was asked for)", precision)
        return "openvino"
    if manifest.engines:
        ok, why = tensorrt_importable()
        if ok and not importlib.import_module("runtime.backends.trt").available():
            ok, why = False, "cuda-python (or TensorRT >= 10.9) is missing"
        if ok:
            log.info("backend auto -> trt (%d TensorRT engines in the manifest)", len(manifest.engines))
            return "trt"
        reason = f"the manifest has TensorRT engines but {why}"
    else:
        reason = "the manifest lists no TensorRT engines"
    if _on_cpu(device):
        ok, why = openvino_bf16_ready(manifest)
        if ok:
            log.info("backend auto -> openvino bf16 (%s; CPU with native BF16 and a passing BF16 gate)", reason)
            return "openvino"
        reason += f"; not openvino bf16: {why}"
    log.info("backend auto -> ort (%s)", reason)
    return "ort"


def create(name: str, artifacts_dir, manifest, device: str | None = None, *,
           intra_op_threads: int | None = None, precision: str | None = None,
           force_precision: bool = False) -> Backend:
    """Instantiate artifact backend `name` ("auto" | "ort" | "trt" | "openvino") for a verified task
    directory. intra_op_threads sizes the CPU pool of ONNX Runtime and OpenVINO (TensorRT runs on
    the GPU and has none); precision ("fp32" | "bf16") and force_precision (BF16 without a
    passing gate) are the openvino backend's (runtime/backends/openvino.py)."""
    chosen = resolve(name, manifest, device, precision)
    if name == "auto" and chosen == "openvino" and precision is None:
        precision = "bf16"  # the only reason auto picks openvino
    name = chosen
    if (precision is not None or force_precision) and name != "openvino":
        raise SgexError(f"precision/force-precision apply to the openvino backend only, not {name}")
    if name == "trt" and not manifest.engines:
        raise SgexError(f"{artifacts_dir}: the manifest lists no TensorRT engines "
                        f"(build them with sgex-export, or use --backend ort)")
    module, cls = ARTIFACT_BACKENDS[name]
    kwargs = {}
    if name == "ort":
        kwargs["intra_op_threads"] = intra_op_threads
    elif name == "openvino":
        kwargs.update(precision=precision or "fp32", threads=intra_op_threads, force_precision=force_precision)
    elif intra_op_threads is not None:
        log.info("%s backend: intra-op threads %d do not apply (it runs on the GPU)", name, intra_op_threads)
    return getattr(importlib.import_module(module), cls)(artifacts_dir, manifest, device, **kwargs)

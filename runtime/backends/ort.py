"""ONNX Runtime backend: one InferenceSession per graph key, created on first use.

Provider: CUDAExecutionProvider when onnxruntime-gpu provides it (device None/"cuda"), else
CPUExecutionProvider (device None/"cpu"); the choice is logged, and asking for "cuda" where the
provider is missing is an error, not a fallback. Manifests of flavor "plugin" contain the fused
`FusedModulatedConv2d` node, which needs the onnxruntime-extensions op registered through
`kernels.onnx_op.ort_session_options()`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from runtime.backends.base import Backend
from runtime.errors import MissingDependency, SgexError, require

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _device_id(device: str) -> int:
    if ":" not in device:
        return 0
    idx = device.split(":", 1)[1]
    if not idx.isdigit():
        raise SgexError(f"bad device {device!r} (expected cpu, cuda or cuda:N)")
    return int(idx)


def choose_providers(available: list[str], device: str | None) -> list:
    """Provider list for InferenceSession. device None: CUDA if available else CPU."""
    if device is None or device == "auto":
        return [(CUDA, {"device_id": 0}), CPU] if CUDA in available else [CPU]
    if device == "cpu":
        return [CPU]
    if device.startswith("cuda"):
        if CUDA not in available:
            raise SgexError(f"device {device!r}: this onnxruntime has no {CUDA} (available: "
                            f"{', '.join(available)}); pip install onnxruntime-gpu")
        return [(CUDA, {"device_id": _device_id(device)}), CPU]
    raise SgexError(f"bad device {device!r} for the ort backend (expected cpu, cuda or cuda:N)")


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, artifacts_dir, manifest, device: str | None = None, *,
                 intra_op_threads: int | None = None):
        """artifacts_dir: the task directory; manifest: its verified runtime.manifest.Manifest;
        intra_op_threads: ONNX Runtime's intra-op pool size (None: its default, one thread per
        physical core; a server replica passes its CPU share so replicas do not oversubscribe)."""
        if intra_op_threads is not None and intra_op_threads < 1:
            raise SgexError(f"intra-op threads must be >= 1, got {intra_op_threads}")
        ort = require("onnxruntime", "onnx", "ONNX Runtime")
        self._ort = ort
        self.dir = Path(artifacts_dir)
        self.manifest = manifest
        self.providers = choose_providers(ort.get_available_providers(), device)
        self.provider = self.providers[0] if isinstance(self.providers[0], str) else self.providers[0][0]
        self._plugin = manifest.flavor == "plugin"
        self._sessions: dict = {}
        self._outputs: dict[str, list[str]] = {}
        self.intra_op_threads = intra_op_threads
        log.info("ort backend: onnxruntime %s, %s%s, intra-op threads %s", ort.__version__, self.provider,
                 " (device auto)" if device in (None, "auto") else "",
                 intra_op_threads if intra_op_threads is not None else "default")

    def _options(self):
        if self._plugin:
            onnx_op = require("kernels.onnx_op", "onnx", "the fused-op ONNX Runtime kernel")
            try:
                opts = onnx_op.ort_session_options()
            except ImportError as e:  # onnxruntime-extensions missing
                raise MissingDependency("onnxruntime-extensions (plugin-flavor graphs)", "onnx", str(e)) from None
        else:
            opts = self._ort.SessionOptions()
        if self.intra_op_threads is not None:
            opts.intra_op_num_threads = self.intra_op_threads
        return opts

    def session(self, key: str):
        """The InferenceSession of graph `key` (created and cached on first use)."""
        if key not in self._sessions:
            # Loaded from the bytes that were hashed, never from the path: a graph changed after
            # the Engine verified its directory is refused here instead of run.
            data = self.manifest.read_verified(self.dir, key)
            sess = self._ort.InferenceSession(data, sess_options=self._options(), providers=self.providers)
            self._sessions[key] = sess
            self._outputs[key] = [o.name for o in sess.get_outputs()]
        return self._sessions[key]

    def run(self, key: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.session(key)
        outs = sess.run(self._outputs[key], feeds)
        return dict(zip(self._outputs[key], outs))

    def describe(self) -> str:
        return f"onnxruntime {self._ort.__version__} {self.provider}"

    def close(self) -> None:
        self._sessions.clear()

"""The one interface every backend implements, so ONNX Runtime, TensorRT, OpenVINO and the PyTorch
reference are interchangeable and comparable on the same feeds.

Graph keys and I/O names are those of the manifest (runtime/manifest.py):

    "style"            x2 float32 [B, 3, 256, 256] in [-1, 1]            -> wplus [B, 18, D]
    "synth@<side>"     x1 float32 [B, 3, H, W] in [-1, 1] (H, W multiples of 8, <= side/4),
                       wplus [B, 18, D], editing_w [B, 18, D] (edit task only, already scaled),
                       noise_0..noise_16 [B, 1, h_j, w_j] (manifest noise "explicit" only)
                                                                         -> y [B, 3, 4H, 4W]
    "translate@<side>" x float32 [B, 1 or 19, H, W], z [B, D], noise_0..noise_16 (explicit noise)
                                                                         -> y [B, 3, 4H, 4W]

Outputs are float32 and unclamped; `runtime.Engine` does the pre/post-processing, padding,
bucket routing and noise generation, so a backend only runs graphs.
"""

from __future__ import annotations

import abc

import numpy as np


class Backend(abc.ABC):
    """Runs one exported task's graphs. Construct through `runtime.backends.create`."""

    name: str = ""  # "ort" | "torch" | "trt" | "openvino"

    @abc.abstractmethod
    def run(self, key: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph `key` ("style", "synth@256", ...) on host float32 arrays; returns its outputs
        by name as host float32 arrays."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for logs and benchmark reports, e.g. "onnxruntime 1.31.1 CPUExecutionProvider"."""

    def close(self) -> None:
        """Release sessions/engines/device memory; the backend is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

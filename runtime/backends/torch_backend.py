"""PyTorch backend: runs the reference model (export.networks.StyleGANEX) behind the same graph
keys and I/O names as the ONNX graphs, so it is the parity oracle for every other backend.

The bucket side of a key is ignored (the model takes any size that is a multiple of 8). torch is
imported here only; `runtime` itself imports without it.
"""

from __future__ import annotations

import logging

import numpy as np

from runtime.backends.base import Backend
from runtime.errors import SgexError, require
from runtime.manifest import parse_graph_key
from runtime.tasks import N_NOISE

log = logging.getLogger(__name__)

_OUTPUTS = {"style": "wplus", "synth": "y", "translate": "y"}


def resolve_device(device: str | None) -> str:
    """"cpu", "cuda" or "cuda:N"; None picks cuda when available (logged)."""
    torch = require("torch", "torch", "PyTorch")
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("torch backend: device auto -> %s", device)
        return device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SgexError(f"device {device!r}: this PyTorch has no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise SgexError(f"bad device {device!r} for the torch backend (expected cpu, cuda or cuda:N)")
    return device


def _writable(a: np.ndarray) -> np.ndarray:
    """torch.from_numpy shares memory and wants a writable array (broadcast views are not)."""
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, device: str | None = "cpu", modconv_impl: str | None = None, *,
                 precision: str = "fp32", plan: dict | None = None, cuda_graphs: bool = False,
                 compile_mode: str | None = None):
        """model: export.networks.StyleGANEX (moved to `device`, put in eval mode).

        precision "fp16" casts it to FP16 with the FP32 islands of `plan` (a precision-plan dict;
        None = the default plan); cuda_graphs captures each (graph, bucket, batch, size) once
        and replays it (CUDA only); compile_mode wraps style/synth/translate in torch.compile.
        See runtime/backends/torch_gpu.py."""
        from runtime.backends.torch_gpu import TorchPath

        self._torch = require("torch", "torch", "PyTorch")
        self.device = resolve_device(device)
        self.path = TorchPath(model, self.device, precision=precision, plan=plan,
                              modconv_impl=modconv_impl, cuda_graphs=cuda_graphs,
                              compile_mode=compile_mode)
        self.model = self.path.model

    def run(self, key: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        graph, bucket = parse_graph_key(key)
        if graph not in _OUTPUTS:
            raise SgexError(f"torch backend: unknown graph {graph!r} in key {key!r}")
        t = {k: torch.from_numpy(_writable(v)).to(self.device, self.path.input_dtype(k))
             for k, v in feeds.items()}
        noises = [t.pop(f"noise_{j}") for j in range(N_NOISE)] if "noise_0" in t else None
        with torch.inference_mode():
            if graph == "style":
                out = self.path.run("style", bucket, x2=t.pop("x2"))
            elif graph == "synth":
                out = self.path.run("synth", bucket, x1=t.pop("x1"), wplus=t.pop("wplus"),
                                    editing_w=t.pop("editing_w", None), noises=noises)
            else:
                out = self.path.run("translate", bucket, x=t.pop("x"), z=t.pop("z"), noises=noises)
        if t:
            raise SgexError(f"torch backend: graph {key!r} takes no inputs {sorted(t)}")
        return {_OUTPUTS[graph]: out.float().cpu().numpy()}

    def describe(self) -> str:
        torch = self._torch
        where = torch.cuda.get_device_name(self.device) if self.device.startswith("cuda") else "cpu"
        return f"torch {torch.__version__} {where} ({self.path.describe()})"

    def close(self) -> None:
        self.model = None
        self.path = None

"""sgex-bench: latency of sgex's backends against the official PyTorch recipe, same run, same inputs.

Backends (each only if available; one named explicitly that is not available is an error):

  torch-official  the baseline: the official recipe in PyTorch FP32 eager (`forward_official`):
                  the style code is recomputed for every image and every video frame, the x1
                  encoder pass computes its 18 unused style heads, modulated convs are grouped.
  torch           sgex's PyTorch path: `style` once per image (once per clip in video mode), then
                  `synth` (or `translate`); unused style heads skipped. FP16 on CUDA with the
                  precision plan's FP32 islands (--plan; default plan otherwise) and the fused
                  Triton op for every stride-1 modulated conv; FP32 on CPU.
  torch-cudagraph the torch path with every (graph, bucket, batch, size) captured once as a CUDA
                  graph and replayed (CUDA only; named explicitly, never chosen by default).
  torch-compile   the torch path through torch.compile(--compile-mode, dynamic=False) (named
                  explicitly, never chosen by default: compiling takes minutes).
  ort             the exported ONNX graphs through `runtime.Engine(backend="ort")`; exported to a
                  temporary directory with `export.onnx.export_task` when --artifacts is not given.
  trt             the TensorRT engines of --artifacts through `runtime.Engine(backend="trt")`.
  openvino-fp32   the exported ONNX graphs through `runtime.Engine(backend="openvino",
  openvino-bf16   precision="fp32" | "bf16")` on the CPU (compiled before timing); bf16 only on an
                  --artifacts directory that passed the BF16 gate (sgex-calib --bf16), never forced.

Modes: "image" times style + synth per image (batch); "video" times style once per clip and synth
per frame (the baseline recomputes the style per frame, as the official video script does).

End to end (video mode, sgex's backends): a synthetic clip of --frames frames at the bucket's
largest x1, res/4 x res/4, so the written frames are res x res as in the model-time rows (seeded
noise, 25 fps; H.264 + an AAC tone when PyAV is installed, else OpenCV mp4v) goes through
`runtime.video.run_video` exactly as `sgex-run` runs it: decode, `Engine.process_video` in batches
of --batch, encode (PyAV: libx264 at the default CRF with the audio copied; OpenCV: mp4v). Each
library is timed serially (one thread, stage after stage) and pipelined (decode and encode threads
around the engine), alternating, --iters clips each after one untimed clip; frames/s beside the
model-only frames/s of the same backend (the graphs called directly, above) and the engine-only
frames/s (Engine.process_video on the clip's frames already in memory), and the pipelined speed-up
over the serial loop.

Timing: warm-up calls are excluded; CPU uses time.perf_counter; CUDA times the torch backends with
CUDA events and synchronizes after every call; ort/trt on CUDA take and return host arrays, so they
are timed as synchronized wall time (the JSON names the timer of every backend). Every raw timing,
the machine, the versions, the threads and the shapes go into the JSON (format "sgex-bench").

Work: GFLOP per image counted once with FlopCounterMode on a meta-device copy of the architecture
(the torch path's ops at the benchmarked shape, no arithmetic); achieved TFLOP/s of every backend
uses sgex's count (useful work). Memory: per-backend peak RSS on CPU, torch/device memory on CUDA.

Accuracy: every backend's float output is compared with the baseline's on the same inputs and the
same explicit noise (max |diff|, relative max |diff|, PSNR over the nominal output range [-1, 1]
and over the baseline's own range), so a fast wrong backend cannot look good.

Library entry point: `run_benchmark(BenchConfig) -> dict`; the CLI is a thin wrapper (`main`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from runtime._cli import run_main, setup_logging
from runtime.buckets import check_side
from runtime.errors import MissingDependency, SgexError
from runtime.manifest import atomic_write_bytes, atomic_write_text, graph_key
from runtime.tasks import ALIGNED_SIZE, N_LATENT, N_NOISE, OUTPUT_SCALE, TASKS, get_task, output_size

log = logging.getLogger(__name__)

FORMAT = "sgex-bench"
VERSION = 1
BASELINE = "torch-official"
BACKENDS = ("torch-official", "torch", "ort", "trt", "openvino-fp32", "openvino-bf16", "torch-cudagraph",
            "torch-compile")
# Variants of the torch path: run only when named (capture and compile cost minutes, CUDA graphs
# need a GPU), so "every available backend" stays what it was.
TORCH_VARIANTS = {"torch-cudagraph": {"cuda_graphs": True}, "torch-compile": {"compile": True}}
OPENVINO = {"openvino-fp32": "fp32", "openvino-bf16": "bf16"}  # bench name -> openvino precision
MODES = ("image", "video")
PSNR_PEAK = 2.0  # nominal output range [-1, 1]
DISAGREE = 1e-2  # relative max |diff| above which a backend is logged as disagreeing (FP16 ~1e-3)
# BF16 keeps 8 significant bits (FP16: 11), so one element's |diff| says little about it; its
# accuracy is gated by PSNR in sgex-calib --bf16 (the reference's own range as peak), and a BF16 row
# is judged by that same figure against the gate's target (calib.bf16.DEFAULT_TARGET_PSNR)
PSNR_JUDGED = {"bf16"}
FLOP_COUNTER = "torch.utils.flop_counter.FlopCounterMode (1 multiply-add = 2 FLOP)"


@dataclass
class BenchConfig:
    """What to benchmark. `res`: the buckets, named by their output side (runtime/buckets.py); each
    is timed at its largest x1, res/4 x res/4, so the output is res x res."""

    task: str
    res: tuple[int, ...]
    backends: tuple[str, ...] | None = None  # None: every available backend (logged)
    batch: int = 1
    frames: int = 8  # video mode: frames per clip
    iters: int = 10  # timed calls (image mode) or timed clips (video mode)
    warmup: int = 2  # untimed calls (style + one frame) before timing, per backend
    mode: str = "image"
    ckpt: str | None = None
    random_weights: bool = False
    artifacts: str | None = None  # task directory with manifest.json (ort/trt)
    device: str = "cpu"
    seed: int = 0
    width_div: int = 1  # channel divisor of random weights (tests use 4)
    command: str | None = None  # the command line, recorded in the JSON
    plan: str | None = None  # precision plan JSON of the CUDA FP16 torch path (None: default plan)
    compile_mode: str = "default"  # torch.compile mode of torch-compile
    faces_photo: str | None = None  # time the face stages (runtime.faces) per frame on this photo
    end_to_end: bool = True  # video mode: also time decode + model + encode (runtime.video), serial and pipelined

    def check(self) -> None:
        get_task(self.task)
        if not self.res:
            raise SgexError("--res needs at least one bucket (output side)")
        for r in self.res:
            check_side(r)
        if self.mode not in MODES:
            raise SgexError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name, v, lo in (("--batch", self.batch, 1), ("--frames", self.frames, 1),
                            ("--iters", self.iters, 1), ("--warmup", self.warmup, 0),
                            ("--width-div", self.width_div, 1)):
            if v < lo:
                raise SgexError(f"{name} must be >= {lo}, got {v}")
        if self.device not in ("cpu", "cuda"):
            raise SgexError(f"--device must be cpu or cuda, got {self.device!r}")
        if (self.ckpt is None) == (not self.random_weights):
            raise SgexError("give exactly one of --ckpt FILE or --random-weights")
        if self.faces_photo is not None and not Path(self.faces_photo).is_file():
            raise SgexError(f"--faces-photo {self.faces_photo}: no such file")
        if self.backends is not None:
            unknown = [b for b in self.backends if b not in BACKENDS]
            if unknown:
                raise SgexError(f"unknown backend {unknown[0]!r} (choose from: {', '.join(BACKENDS)})")
            if not self.backends:
                raise SgexError("--backends is empty")
        from runtime.backends.torch_gpu import COMPILE_MODES

        if self.compile_mode not in COMPILE_MODES:
            raise SgexError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.plan is not None:
            from export.fp16 import load_plan

            load_plan(self.plan, self.task)


# -- availability -------------------------------------------------------------------------------

def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def task_dir(artifacts: str, task: str) -> str:
    """--artifacts may name the task directory or the export root holding <task>/manifest.json."""
    p = Path(artifacts)
    if not (p / "manifest.json").is_file() and (p / task / "manifest.json").is_file():
        return str(p / task)
    return str(p)


def backend_unavailable(name: str, device: str, artifacts: str | None, task: str) -> str | None:
    """Why backend `name` cannot run here (one line with the install hint), or None."""
    if not _has("torch"):  # every backend needs the checkpoint loaded by PyTorch (inputs, baseline)
        return str(MissingDependency("PyTorch", "torch"))
    if name in ("torch-official", "torch", "torch-compile"):
        return None
    if name == "torch-cudagraph":
        return None if device == "cuda" else "CUDA graphs need --device cuda"
    if name == "ort":
        if not _has("onnxruntime"):
            return str(MissingDependency("onnxruntime", "onnx"))
        if artifacts is None and not (_has("onnx") and _has("onnxscript")):
            return str(MissingDependency("onnx/onnxscript (to export the graphs; or pass --artifacts)", "onnx"))
        if device == "cuda":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return ("onnxruntime has no CUDAExecutionProvider (pip uninstall onnxruntime && "
                        "pip install -c constraints.txt onnxruntime-gpu)")
        return None
    if name in OPENVINO:
        return _openvino_unavailable(OPENVINO[name], device, artifacts, task)
    if name == "trt":
        if not _has("tensorrt"):
            return str(MissingDependency("TensorRT", "trt"))
        if device != "cuda":
            return "TensorRT needs --device cuda"
        if artifacts is None:
            return "trt needs --artifacts DIR holding TensorRT engines (build them with sgex-export)"
        from runtime.manifest import Manifest

        if not Manifest.load(task_dir(artifacts, task)).engines:
            return f"{artifacts} holds no TensorRT engines (build them with sgex-export)"
        return None
    raise SgexError(f"unknown backend {name!r} (choose from: {', '.join(BACKENDS)})")


def _openvino_unavailable(precision: str, device: str, artifacts: str | None, task: str) -> str | None:
    if not _has("openvino"):
        return str(MissingDependency("OpenVINO", "openvino"))
    if device != "cpu":
        return "OpenVINO runs on --device cpu"
    if artifacts is None and not (_has("onnx") and _has("onnxscript")):
        return str(MissingDependency("onnx/onnxscript (to export the graphs; or pass --artifacts)", "onnx"))
    if precision == "bf16":
        from runtime.backends import openvino_bf16_ready
        from runtime.manifest import Manifest

        if artifacts is None:
            return "openvino-bf16 needs --artifacts DIR that passed the BF16 gate (sgex-calib --bf16 --artifacts DIR)"
        ok, why = openvino_bf16_ready(Manifest.load(task_dir(artifacts, task)))
        if not ok:
            return why
    return None


def resolve_backends(cfg: BenchConfig) -> list[str]:
    """The requested backends (each checked) or every available one (logged), baseline first."""
    if cfg.backends is not None:
        for b in cfg.backends:
            why = backend_unavailable(b, cfg.device, cfg.artifacts, cfg.task)
            if why:
                raise SgexError(f"backend {b!r} is unavailable: {why}")
        chosen = list(dict.fromkeys(cfg.backends))
    else:
        chosen, skipped = [], []
        for b in (b for b in BACKENDS if b not in TORCH_VARIANTS):
            why = backend_unavailable(b, cfg.device, cfg.artifacts, cfg.task)
            if why:
                skipped.append(f"{b}: {why}")
            else:
                chosen.append(b)
        if not chosen:
            raise SgexError("no backend is available: " + "; ".join(skipped))
        log.info("backends (all available): %s%s", ", ".join(chosen),
                 "".join(f"; skipped {s}" for s in skipped))
    return sorted(chosen, key=lambda b: b != BASELINE)


# -- inputs ---------------------------------------------------------------------------------------

@dataclass
class BenchInputs:
    """Host inputs shared by every backend (float32, NCHW, batch-major).

    frames: x1 per frame, each [B, C, R, R] (image mode: one); RGB in [-1, 1], sketch in [0, 1],
    mask one-hot. x2 [B, 3, 256, 256] (RGB tasks) or None. z [B, D] (sketch/mask) or None.
    editing_w [B, 18, D] (edit task: ckpt editing_w[0:1], scale 1) or None. noises: 17 maps
    [B, 1, h_j, w_j] (explicit noise) or None (zero noise)."""

    frames: list
    x2: object = None
    z: object = None
    editing_w: object = None
    noises: list | None = None

    def shapes(self) -> dict:
        d = {"x1": list(self.frames[0].shape), "frames": len(self.frames)}
        for k in ("x2", "z", "editing_w"):
            v = getattr(self, k)
            if v is not None:
                d[k] = list(v.shape)
        if self.noises is not None:
            d["noise"] = [list(n.shape) for n in self.noises]
        return d


def make_inputs(task_name: str, res: int, batch: int, n_frames: int, seed: int, style_dim: int,
                editing_w, noise: bool) -> BenchInputs:
    """Seeded random inputs at x1 side `res` (frame t draws from stream (seed, 1, t), x2 from
    (seed, 2)). z and the explicit noise follow the runtime's rule exactly
    (`runtime.engine.make_random_inputs(seed, ...)`), so the inputs are those `sgex-run` feeds."""
    import numpy as np

    from runtime.engine import make_random_inputs

    task = get_task(task_name)

    def frame(t: int):
        rng = np.random.default_rng([seed, 1, t])
        if task.input_kind == "rgb":
            return rng.uniform(-1.0, 1.0, (batch, 3, res, res)).astype(np.float32)
        if task.input_kind == "sketch":
            return rng.uniform(0.0, 1.0, (batch, 1, res, res)).astype(np.float32)
        labels = rng.integers(0, task.in_channels, (batch, res, res))
        return np.eye(task.in_channels, dtype=np.float32)[labels].transpose(0, 3, 1, 2).copy()

    x2 = None
    if "style" in task.graphs:
        rng = np.random.default_rng([seed, 2])
        x2 = rng.uniform(-1.0, 1.0, (batch, 3, ALIGNED_SIZE, ALIGNED_SIZE)).astype(np.float32)
    rand = make_random_inputs(seed, batch, res, res, noise=noise, z_dim=style_dim if task.inject else None)
    ew = None
    if task.editing:
        ew = np.broadcast_to(np.asarray(editing_w, dtype=np.float32)[0:1],
                             (batch, N_LATENT, style_dim)).copy()
    noises = [rand[f"noise_{j}"] for j in range(N_NOISE)] if noise else None
    return BenchInputs([frame(t) for t in range(n_frames)], x2, rand.get("z"), ew, noises)


# -- runners: one per backend; style() -> handle, frame(t, handle) -> output --------------------

class _TorchRunner:
    """torch-official (forward_official, FP32) or an sgex torch path (style once + synth/translate
    through runtime.backends.torch_gpu.TorchPath: torch, torch-cudagraph, torch-compile)."""

    def __init__(self, name: str, model, inputs: BenchInputs, task, device: str, dtype, path=None,
                 res: int | None = None):
        import torch

        self.name, self.model, self.task, self.device, self.dtype = name, model, task, device, dtype
        self.path, self.res = path, res
        self.precision = path.precision if path is not None else {torch.float32: "fp32",
                                                                  torch.float16: "fp16"}[dtype]
        self.timer = "cuda-events" if device == "cuda" else "perf_counter"  # (meta: FLOP counting only)
        self.stages = ("forward",) if name == BASELINE or "style" not in task.graphs else ("style", "synth")

        def t(a, key):
            if a is None:
                return None
            return torch.from_numpy(a).to(device=device, dtype=path.input_dtype(key) if path else dtype)

        self.frames = [t(f, "x1") for f in inputs.frames]
        self.x2, self.z, self.editing_w = t(inputs.x2, "x2"), t(inputs.z, "z"), t(inputs.editing_w, "editing_w")
        self.noises = None if inputs.noises is None else [t(n, "noise") for n in inputs.noises]
        impl = getattr(model, "modconv_impl", None)
        how = "eager" if path is None else path.describe()
        self.detail = f"torch {torch.__version__} {device} {self.precision} {how}"
        self.settings = {"threads": torch.get_num_threads(), "modconv_impl": "official (grouped)"
                         if name == BASELINE else impl}
        if path is not None:
            self.settings.update(fp32_islands=len(path.islands), cuda_graphs=path.graphs is not None,
                                 compile_mode=path.compile_mode)

    def style(self):
        if self.name == BASELINE or "style" not in self.task.graphs:
            return None
        if self.path is not None:
            return self.path.run("style", self.res, x2=self.x2)
        return self.model.style(self.x2)

    def frame(self, t: int, wplus):
        m = self.model
        if self.name == BASELINE:
            if "translate" in self.task.graphs:
                return m.forward_official(self.frames[t], z=self.z, noises=self.noises)
            return m.forward_official(self.frames[t], self.x2, editing_w=self.editing_w, noises=self.noises)
        if self.path is not None:
            if "translate" in self.task.graphs:
                return self.path.run("translate", self.res, x=self.frames[t], z=self.z, noises=self.noises)
            return self.path.run("synth", self.res, x1=self.frames[t], wplus=wplus,
                                 editing_w=self.editing_w, noises=self.noises)
        if "translate" in self.task.graphs:
            return m.translate(self.frames[t], self.z, noises=self.noises)
        return m.synth(self.frames[t], wplus, editing_w=self.editing_w, noises=self.noises)

    @staticmethod
    def to_numpy(y):
        return y.detach().float().cpu().numpy()

    def close(self) -> None:
        """Drop the device inputs (the model is shared and stays)."""
        self.frames, self.x2, self.z, self.editing_w, self.noises = [], None, None, None, None


def exported_engine(name: str, artifacts: str, device: str, task: str):
    """runtime.Engine on exported artifacts for a bench backend name (ort, trt, openvino-fp32/bf16)."""
    from runtime.engine import Engine

    if name in OPENVINO:
        return Engine(artifacts, backend="openvino", device=device, task=task, precision=OPENVINO[name])
    return Engine(artifacts, backend=name, device=device, task=task)


class _EngineRunner:
    """ort or trt: the exported graphs through runtime.Engine's backend, host arrays in and out."""

    def __init__(self, name: str, artifacts: str, inputs: BenchInputs, task, res: int, device: str):
        self.name, self.task, self.inputs = name, task, inputs
        self.engine = exported_engine(name, artifacts, device, task.name)
        m = self.engine.manifest
        self.key = graph_key(task.graphs[-1], res)
        names = [i["name"] for i in m.graph(self.key)["inputs"]]
        self.timer = "perf_counter" if device == "cpu" else "perf_counter+cuda-synchronize (host arrays)"
        self.precision = (m.engines.get(self.key, {}).get("precision", m.precision) if name == "trt"
                          else OPENVINO.get(name, m.precision))
        self.detail = self.engine.backend.describe()
        self.stages = ("style", "synth") if "style" in task.graphs else ("forward",)
        self.feeds = []
        for x1 in inputs.frames:
            feeds = {}
            for n in names:
                if n in ("x1", "x"):
                    feeds[n] = x1
                elif n == "wplus":
                    feeds[n] = None  # filled per call from style()
                elif n == "z":
                    feeds[n] = inputs.z
                elif n == "editing_w":
                    feeds[n] = inputs.editing_w
                elif n.startswith("noise_") and inputs.noises is not None:
                    feeds[n] = inputs.noises[int(n.split("_", 1)[1])]
                else:
                    raise SgexError(f"{artifacts}: graph {self.key} has input {n!r} this benchmark "
                                    f"cannot feed (noise {m.noise!r} export vs task noise)")
            self.feeds.append(feeds)
        self.settings: dict = {}
        if name == "ort":  # sessions are created on first use: create them now, outside the timing
            for key in (["style"] if "style" in task.graphs else []) + [self.key]:
                so = self.engine.backend.session(key).get_session_options()
                self.settings[key] = {"graph_optimization_level": str(so.graph_optimization_level),
                                      "intra_op_num_threads": so.intra_op_num_threads,
                                      "inter_op_num_threads": so.inter_op_num_threads,
                                      "execution_mode": str(so.execution_mode)}
        if name in OPENVINO:  # compile outside the timing too
            be = self.engine.backend
            for key in (["style"] if "style" in task.graphs else []) + [self.key]:
                be.compiled(key)
                self.settings[key] = {"config": {k: str(v) for k, v in be.config.items()},
                                      "fp32_pins": len(be.pins.get(key, []))}

    def style(self):
        if "style" not in self.task.graphs:
            return None
        return self.engine.backend.run("style", {"x2": self.inputs.x2})["wplus"]

    def frame(self, t: int, wplus):
        feeds = self.feeds[t]
        if "wplus" in feeds:
            feeds = dict(feeds, wplus=wplus)
        return self.engine.backend.run(self.key, feeds)["y"]

    @staticmethod
    def to_numpy(y):
        import numpy as np

        return np.asarray(y, dtype=np.float32)

    def close(self) -> None:
        """Release the sessions/engines before the next backend runs."""
        self.engine.close()


# -- timing ---------------------------------------------------------------------------------------

class _Clock:
    """ms of one call: CUDA events for torch on CUDA, synchronized perf_counter otherwise."""

    def __init__(self, device: str, events: bool):
        self.device, self.events = device, events and device == "cuda"
        if device == "cuda":
            import torch

            self.torch = torch

    def __call__(self, fn):
        if self.events:
            cuda = self.torch.cuda
            start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, float(start.elapsed_time(end))
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return out, (time.perf_counter() - t0) * 1e3


def summarize(ms: list[float]) -> dict:
    """p50/p90/p99 (linear interpolation), mean, std, min, max of a list of milliseconds."""
    import numpy as np

    a = np.asarray(ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return {"n": int(a.size), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(a.mean()),
            "std_ms": float(a.std()), "min_ms": float(a.min()), "max_ms": float(a.max())}


def _proc_status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> bool:
    """Return freed glibc heap pages to the OS; False where there is no glibc malloc_trim."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


class _MemoryProbe:
    """Peak memory of one backend's timed section.

    CPU: Linux peak RSS (VmHWM) reset through /proc/self/clear_refs ("5") before the backend runs,
    so the peak is per backend; the delta is over VmRSS at the reset (weights, sessions already
    loaded; glibc's malloc_trim(0) first returns heap freed by earlier backends, so the delta is
    not hidden in cached pages; allocator caches of torch/onnxruntime may still hide part of it). Where the reset is refused the process-lifetime ru_maxrss is reported and named so.
    CUDA: torch.cuda.max_memory_allocated (torch allocations only: ort/trt allocate outside torch)
    and the device-wide used-memory delta from cudaMemGetInfo."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            free, total = torch.cuda.mem_get_info()
            self.used0 = total - free
            return
        trimmed = _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = ("VmHWM (peak RSS) reset via /proc/self/clear_refs before this backend"
                           + (", after malloc_trim(0)" if trimmed else ", no malloc_trim (not glibc)"))
        except OSError:
            self.method = "ru_maxrss (process lifetime peak, NOT per backend: clear_refs refused)"
        self.rss0 = _proc_status_kb("VmRSS")

    def stop(self) -> dict:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            return {"method": "torch.cuda.max_memory_allocated (torch allocator only) + cudaMemGetInfo delta",
                    "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
                    "device_used_delta_mb": (total - free - self.used0) / 2**20}
        if self.method.startswith("VmHWM"):
            peak = _proc_status_kb("VmHWM")
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {"method": self.method, "peak_mb": peak / 1024,
                "peak_delta_mb": None if self.rss0 is None else (peak - self.rss0) / 1024}


def time_backend(runner, device: str, mode: str, warmup: int, iters: int) -> tuple[dict, list]:
    """Warm up, then time `runner`. Returns (raw ms: "style" per call, "frame" per synth call,
    "call" per image-mode call or per clip; outputs kept for the accuracy check: image mode the
    last output, video mode frames 0 and last of the last clip)."""
    clock = _Clock(device, events=isinstance(runner, _TorchRunner))
    last = len(runner_frames(runner)) - 1
    for _ in range(warmup):
        runner.frame(0, runner.style())
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    raw: dict[str, list[float]] = {"style": [], "frame": [], "call": []}
    kept: list = []
    for _ in range(iters):
        handle, ms_style = clock(runner.style)
        if mode == "image":
            out, ms = clock(lambda: runner.frame(0, handle))
            kept = [out]
            frame_ms = [ms]
        else:
            frame_ms, kept = [], []
            for t in range(last + 1):
                out, ms = clock(lambda t=t: runner.frame(t, handle))
                frame_ms.append(ms)
                if t in (0, last):
                    kept.append(out)
        has_style = handle is not None
        raw["style"].append(ms_style if has_style else 0.0)
        raw["frame"].extend(frame_ms)
        raw["call"].append((ms_style if has_style else 0.0) + sum(frame_ms))
    return raw, [runner.to_numpy(o) for o in kept]


def runner_frames(runner) -> list:
    return runner.frames if isinstance(runner, _TorchRunner) else runner.inputs.frames


def compare(out, ref) -> dict:
    """Float outputs vs the baseline's: max and mean |diff|; the max relative to the baseline's
    largest |value|; PSNR with peak 2 (the nominal output range [-1, 1]: the meaningful figure for
    trained weights) and PSNR with the baseline's own range as peak (meaningful for random weights,
    whose outputs can leave [-1, 1] by orders of magnitude). PSNR is None for identical outputs."""
    import numpy as np

    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise SgexError(f"output shape {out.shape} differs from the baseline's {ref.shape}")
    finite = bool(np.isfinite(out).all())
    d = np.abs(out - ref)
    mse = float(np.mean(d**2))
    ref_absmax = float(np.abs(ref).max())
    ref_range = float(ref.max() - ref.min())

    def psnr(peak: float):
        return None if (mse == 0.0 or not finite or peak <= 0) else 10.0 * math.log10(peak**2 / mse)

    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "rel_max_abs_diff": float(d.max()) / ref_absmax if ref_absmax > 0 else None,
            "psnr_db": psnr(PSNR_PEAK), "psnr_ref_range_db": psnr(ref_range),
            "ref_abs_max": ref_absmax, "ref_range": ref_range,
            "finite": finite, "identical": mse == 0.0}


def disagreement(acc: dict, precision: str) -> str | None:
    """Why a backend's outputs are too far from the baseline's to compare timings, or None. FP32
    and FP16: relative max |diff| above DISAGREE; BF16: PSNR (the reference's range as peak, as
    sgex-calib --bf16 measures it) below the gate's target."""
    if not acc["finite"]:
        return "non-finite output"
    if precision in PSNR_JUDGED:
        from calib.bf16 import DEFAULT_TARGET_PSNR

        db = acc["psnr_ref_range_db"]
        if db is not None and db < DEFAULT_TARGET_PSNR:
            return f"PSNR {db:.1f} dB (reference range as peak) below the BF16 gate's {DEFAULT_TARGET_PSNR:g} dB"
        return None
    rel = acc["rel_max_abs_diff"]
    if rel is None or rel > DISAGREE:
        return f"max |diff| {acc['max_abs_diff']:.3g}, relative {'n/a' if rel is None else f'{rel:.2g}'}"
    return None


def count_flops(config, inputs: BenchInputs, task) -> dict:
    """FLOPs of one call at the benchmarked shape (whole batch) of the sgex path (style, synth or
    translate) and of the official recipe (forward_official), counted once with FlopCounterMode
    on a meta-device copy of the architecture: the same ops and shapes, no arithmetic, no weights."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from export.networks import StyleGANEX

    with torch.device("meta"):
        model = StyleGANEX(config)
    r = _TorchRunner(BASELINE, model, inputs, task, "meta", torch.float32)

    def flops(fn) -> int:
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            fn()
        return int(fc.get_total_flops())

    if "style" in task.graphs:
        style = flops(lambda: model.style(r.x2))
        wplus = torch.zeros((r.x2.shape[0], N_LATENT, config.style_dim), device="meta")
        synth = flops(lambda: model.synth(r.frames[0], wplus, editing_w=r.editing_w, noises=r.noises))
    else:
        style, synth = 0, flops(lambda: model.translate(r.frames[0], r.z, noises=r.noises))
    official = flops(lambda: r.frame(0, None))
    return {"style": style, "synth": synth, "official": official}


# -- the benchmark --------------------------------------------------------------------------------

def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return platform.processor() or None


def _version(module: str) -> str | None:
    if not _has(module):
        return None
    try:
        from importlib.metadata import version

        return version({"onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}.get(module, module))
    except Exception:  # noqa: BLE001 - a distribution without metadata: import it for __version__
        import importlib

        return getattr(importlib.import_module(module), "__version__", None)


def machine_info(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_avg": list(os.getloadavg())}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(device_name=torch.cuda.get_device_name(0), gpu_memory_mb=p.total_memory / 2**20,
                    compute_capability=f"{p.major}.{p.minor}", cuda_runtime=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), driver=_nvidia_driver())
    else:
        info["device_name"] = info["cpu_model"]
    return info


def _nvidia_driver() -> str | None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def _threads() -> dict:
    import torch

    d = {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads(),
         "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
         "onnxruntime": "session defaults of runtime.Engine (intra-op = physical cores)"}
    return d


def _ckpt_matches(manifest, ck) -> str | None:
    """Why the artifacts were not exported from the benchmarked checkpoint (None when they were)."""
    mc = manifest.checkpoint
    if manifest.style_dim != ck.config.style_dim:
        return f"style_dim {manifest.style_dim} vs checkpoint {ck.config.style_dim}"
    if bool(mc.get("random")) != bool(ck.random):
        return "random weights on one side only"
    if ck.random and mc.get("seed") != ck.seed:
        return f"random-weights seed {mc.get('seed')} vs {ck.seed}"
    if not ck.random and mc.get("sha256") and ck.sha256 and mc["sha256"] != ck.sha256:
        return "checkpoint sha256 differs"
    return None


def _export(cfg: BenchConfig, out_dir: str) -> str:
    """Export the task's graphs for every --res bucket into out_dir (not timed); returns the task
    directory. Same checkpoint arguments as the benchmark, so the weights are identical."""
    from export.onnx import export_task

    log.info("exporting ONNX graphs of %s for buckets %s into a temp dir (not timed)", cfg.task, list(cfg.res))
    t0 = time.perf_counter()
    for res in cfg.res:
        manifest = export_task(cfg.task, res, ckpt=cfg.ckpt, random_weights=cfg.random_weights,
                               out=out_dir, max_batch=cfg.batch, seed=cfg.seed,
                               width_div=cfg.width_div, progress=False)
    log.info("export took %.1f s", time.perf_counter() - t0)
    return str(Path(manifest).parent)


def run_benchmark(cfg: BenchConfig) -> dict:
    """Run the benchmark; returns the JSON-ready result (format "sgex-bench", version 1)."""
    cfg.check()
    backends = resolve_backends(cfg)
    import numpy as np
    import torch

    from export.checkpoint import build_model, load_or_random

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SgexError("--device cuda: PyTorch sees no CUDA device")
    task = get_task(cfg.task)
    load_start = list(os.getloadavg())
    tmp = tempfile.TemporaryDirectory(prefix="sgex-bench-")
    try:
        if cfg.random_weights:
            log.warning("RANDOM WEIGHTS (seed %d, width_div %d): every output is noise; the timings "
                        "are those of the real network sizes", cfg.seed, cfg.width_div)
        ck = load_or_random(cfg.task, cfg.ckpt, cfg.random_weights, seed=cfg.seed, width_div=cfg.width_div)
        artifacts = None if cfg.artifacts is None else task_dir(cfg.artifacts, cfg.task)
        if any(b in ("ort", "trt", *OPENVINO) for b in backends):
            if artifacts is None:
                artifacts = _export(cfg, os.path.join(tmp.name, "artifacts"))
            from runtime.manifest import Manifest

            man = Manifest.load(artifacts, task=cfg.task)
            why = _ckpt_matches(man, ck) if cfg.artifacts is not None else None
            if why:
                raise SgexError(f"{artifacts} was not exported from the benchmarked checkpoint ({why}); "
                                f"pass the matching --ckpt/--random-weights --seed or re-export")
            noise = man.noise == "explicit"
        else:
            noise = task.noise == "random"

        model = build_model(ck, cfg.task).eval().to(cfg.device)
        ck.state_dict = {}  # the model holds copies; dropping the file's tensors frees ~1.3 GB of RSS
        paths = torch_paths(cfg, backends, model)
        editing_w = None if ck.editing_w is None else ck.editing_w.float().cpu().numpy()

        runs = []
        for res in cfg.res:
            runs.append(_bench_bucket(cfg, backends, task, res, model, paths, artifacts, editing_w,
                                      noise, ck))
        faces = None
        if cfg.faces_photo is not None:
            faces = bench_face_stages(cfg.faces_photo, cfg.iters, cfg.warmup)
    finally:
        tmp.cleanup()

    return {
        "faces": faces,
        "format": FORMAT, "version": VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": cfg.command,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()
                   if k != "command"},
        "backends": backends, "baseline": BASELINE,
        "checkpoint": {"file": ck.path, "sha256": ck.sha256, "random": ck.random, "seed": ck.seed,
                       "variant": ck.variant, "width_div": ck.config.width_div,
                       "n_fusion": ck.config.n_fusion},
        "machine": dict(machine_info(cfg.device), load_avg_start=load_start,
                        load_avg_end=list(os.getloadavg())),
        "versions": {"sgex": _version("sgex"), "torch": torch.__version__, "numpy": np.__version__,
                     "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx"),
                     "tensorrt": _version("tensorrt"), "openvino": _version("openvino")},
        "threads": _threads(),
        "noise": "explicit" if noise else "zero",
        "flop_counter": FLOP_COUNTER,
        "accuracy_metric": f"vs {BASELINE} on the same inputs: max/mean |diff| of the float outputs, "
                           f"max |diff| / max |baseline|, PSNR with peak {PSNR_PEAK} (range [-1, 1]) "
                           f"and with the baseline's own range as peak",
        "runs": runs,
    }


def torch_paths(cfg: BenchConfig, backends, model) -> dict:
    """backend name -> runtime.backends.torch_gpu.TorchPath for every sgex torch backend: FP16 with
    the plan's FP32 islands and modconv impl auto (the fused Triton op) on CUDA, FP32 on CPU; the
    variants add CUDA graphs or torch.compile. Each CUDA path owns a copy of the model (the FP16
    cast and its hooks change the module)."""
    import copy

    from runtime.backends.torch_gpu import TorchPath

    cuda = cfg.device == "cuda"
    paths = {}
    for name in backends:
        if name != "torch" and name not in TORCH_VARIANTS:
            continue
        m = copy.deepcopy(model) if cuda or name in TORCH_VARIANTS else model
        paths[name] = TorchPath(m, cfg.device, modconv_impl="auto" if cuda else None,
                                **torch_options(cfg, name))
    return paths


def torch_options(cfg: BenchConfig, name: str) -> dict:
    """TorchPath/TorchBackend options of sgex torch backend `name` (torch or a TORCH_VARIANTS)."""
    plan = None
    if cfg.plan is not None:
        from export.fp16 import load_plan

        plan = load_plan(cfg.plan, cfg.task)
    opts = TORCH_VARIANTS.get(name, {})
    return {"precision": "fp16" if cfg.device == "cuda" else "fp32", "plan": plan,
            "cuda_graphs": bool(opts.get("cuda_graphs")),
            "compile_mode": cfg.compile_mode if opts.get("compile") else None}


def bench_face_stages(photo: str, iters: int, warmup: int) -> dict:
    """Per-frame wall time (perf_counter, CPU) of the face pipeline's stages on one photo, the best
    face: detect (dlib detector + 68 landmarks on the frame); crop_align (crop params, the official
    resize + crop, the re-detection on the crop that align_face runs, FFHQ alignment); paste_back
    (the bicubic canvas at the output scale + the feathered blend of a 4x face output; the blend
    does not depend on the pixels, so a constant output stands in for the model's). A video in the
    default (first-frame) mode pays crop only per frame; with --track, detect + crop."""
    import numpy as np

    from runtime import faces as F
    from runtime import io as rio

    frame = rio.read_image(photo)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise SgexError(f"--faces-photo {photo}: needs an RGB photo")
    found = F.detect(frame)
    if not found:
        raise SgexError(f"--faces-photo {photo}: no face found")
    params = F.crop_params(frame.shape, found[0])
    h, w = params.size
    face_out = np.full((4 * h, 4 * w, 3), 128, np.uint8)
    times: dict[str, list[float]] = {"detect": [], "crop_align": [], "crop": [], "paste_back": []}
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        F.detect(frame)
        t1 = time.perf_counter()
        x1 = F.crop(frame, F.crop_params(frame.shape, found[0]))
        t2 = time.perf_counter()
        F.align(x1, F.crop_landmarks(x1, params, found[0]))
        t3 = time.perf_counter()
        canvas = F.paste_canvas(frame, params)
        F.paste_back(canvas, face_out, F.paste_box(params, frame.shape, canvas.shape))
        t4 = time.perf_counter()
        if i >= warmup:
            for k, dt in (("detect", t1 - t0), ("crop", t2 - t1), ("crop_align", t3 - t1), ("paste_back", t4 - t3)):
                times[k].append(dt * 1e3)
    return {"photo": str(photo), "frame": list(frame.shape[:2]), "crop": [h, w],
            "output_frame": [4 * params.h, 4 * params.w], "timer": "time.perf_counter (CPU wall)",
            "stages": {k: summarize(v) for k, v in times.items()}}


def _bench_bucket(cfg, backends, task, res, model, paths, artifacts, editing_w, noise, ck) -> dict:
    import torch

    n_frames = cfg.frames if cfg.mode == "video" else 1
    side = res // OUTPUT_SCALE  # the bucket's largest x1
    inputs = make_inputs(cfg.task, side, cfg.batch, n_frames, cfg.seed, ck.config.style_dim, editing_w, noise)
    B = cfg.batch
    base = _TorchRunner(BASELINE, model, inputs, task, cfg.device, torch.float32)
    flops = count_flops(ck.config, inputs, task)
    # useful work per image: what sgex computes (style once per clip in video mode)
    per_image = (flops["style"] / (n_frames if cfg.mode == "video" else 1) + flops["synth"]) / B
    oh, ow = output_size(side, side)
    result = {"res": res, "bucket": res, "x1": side, "mode": cfg.mode, "batch": B, "frames": n_frames,
              "output_shape": [B, 3, oh, ow], "shapes": inputs.shapes(),
              "gflop": {"style_per_call": flops["style"] / 1e9, "synth_per_call": flops["synth"] / 1e9,
                        "official_per_call": flops["official"] / 1e9,
                        "per_image_sgex": per_image / 1e9, "per_image_official": flops["official"] / B / 1e9},
              "backends": {}}
    outputs, rows = {}, result["backends"]
    for name in backends:
        if name == BASELINE:
            runner = base
        elif name in paths:
            runner = _TorchRunner(name, paths[name].model, inputs, task, cfg.device, None,
                                  path=paths[name], res=res)
        else:
            runner = _EngineRunner(name, artifacts, inputs, task, res, cfg.device)
        log.info("bucket %d: %s (%s)", res, name, runner.detail)
        load_before = list(os.getloadavg())
        probe = _MemoryProbe(cfg.device)
        probe.start()
        with torch.inference_mode():
            raw, kept = time_backend(runner, cfg.device, cfg.mode, cfg.warmup, cfg.iters)
        memory = probe.stop()
        outputs[name] = kept
        calls = summarize(raw["call"])
        images_per_call = B * n_frames
        rows[name] = {
            "precision": runner.precision, "detail": runner.detail, "timer": runner.timer,
            "stages": list(runner.stages), "settings": runner.settings,
            "latency": calls,  # one call = style + synth of a batch (image) or one clip (video)
            "frame_latency": summarize(raw["frame"]),
            "style_latency": summarize(raw["style"]) if "style" in runner.stages else None,
            "throughput": images_per_call * 1e3 / calls["mean_ms"],
            "throughput_unit": "images/s" if cfg.mode == "image" else "frames/s",
            "achieved_tflops": per_image * images_per_call / (calls["mean_ms"] * 1e-3) / 1e12,
            "memory": memory,
            "load_avg_before": load_before,
            "raw_ms": raw,
        }
        runner.close()
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
    if BASELINE not in outputs:
        with torch.inference_mode():
            _, outputs[BASELINE] = time_backend(base, cfg.device, cfg.mode, 0, 1)
    ref = outputs[BASELINE]
    base_p50 = rows[BASELINE]["latency"]["p50_ms"] if BASELINE in rows else None
    for name, row in rows.items():
        cmp = [compare(o, r) for o, r in zip(outputs[name], ref)]

        def worst(key, pick):
            vals = [c[key] for c in cmp]
            return None if any(v is None for v in vals) else pick(vals)

        row["accuracy"] = {
            "vs": BASELINE, "compared": "last output" if cfg.mode == "image" else "frames 0 and last",
            "max_abs_diff": worst("max_abs_diff", max), "mean_abs_diff": worst("mean_abs_diff", max),
            "rel_max_abs_diff": worst("rel_max_abs_diff", max),
            "psnr_db": worst("psnr_db", min), "psnr_ref_range_db": worst("psnr_ref_range_db", min),
            "ref_abs_max": worst("ref_abs_max", max),
            "finite": all(c["finite"] for c in cmp), "identical": all(c["identical"] for c in cmp)}
        if name != BASELINE and (why := disagreement(row["accuracy"], row["precision"])):
            log.warning("bucket %d: %s DISAGREES with %s (%s): its timing is not a valid comparison",
                        res, name, BASELINE, why)
        if base_p50 is not None:
            row["speedup_vs_baseline"] = base_p50 / row["latency"]["p50_ms"]
            row["time_ratio_vs_baseline"] = row["latency"]["p50_ms"] / base_p50
    if cfg.mode == "video" and cfg.end_to_end:
        result["end_to_end"] = bench_end_to_end(cfg, backends, task, res, artifacts, rows)
    return result


# -- end to end (video mode) -----------------------------------------------------------------------

E2E_LIBS = ("opencv", "av")
E2E_FPS = 25


def make_clip(path: str, res: int, frames: int, seed: int, lib: str) -> dict:
    """The end-to-end clip: `frames` seeded-noise RGB frames res x res at E2E_FPS (the caller
    passes the bucket's largest x1, so the output frames are 4*res, the bucket's side); PyAV:
    H.264 (crf 18) with an AAC 440 Hz tone as long as the video; OpenCV: mp4v, no audio."""
    import numpy as np

    rng = np.random.default_rng([seed, 3])
    images = (rng.integers(0, 256, (res, res, 3), dtype=np.uint8) for _ in range(frames))
    if lib == "opencv":
        import cv2

        vw = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), E2E_FPS, (res, res))
        for img in images:
            vw.write(img)
        vw.release()
        return {"frames": frames, "size": [res, res], "fps": E2E_FPS, "video": "mp4v (OpenCV)", "audio": None}
    from runtime.video import write_test_clip

    write_test_clip(path, images, E2E_FPS, crf=18, tone_s=frames / E2E_FPS)
    return {"frames": frames, "size": [res, res], "fps": E2E_FPS, "video": "h264 crf 18 (PyAV)",
            "audio": "aac 44.1 kHz mono tone"}


def _e2e_engine(cfg: BenchConfig, name: str, artifacts: str | None):
    from runtime.engine import Engine

    if name == "torch" or name in TORCH_VARIANTS:
        return Engine.from_checkpoint(cfg.task, ckpt=cfg.ckpt, random_weights=cfg.random_weights,
                                      device=cfg.device, seed=cfg.seed, width_div=cfg.width_div,
                                      modconv_impl="auto" if cfg.device == "cuda" else None,
                                      torch_options=torch_options(cfg, name))
    return exported_engine(name, artifacts, cfg.device, cfg.task)


def time_end_to_end(engine, clip: str, out: str, lib: str, batch: int, warmup: int, iters: int) -> dict:
    """Wall ms per clip of run_video (decode + engine.process_video + encode), serial and
    pipelined alternating; one untimed pipelined clip first when warmup > 0."""
    from runtime.video import VideoReader, resolve_encoding, run_video

    def once(pipelined: bool) -> tuple[float, int, str]:
        reader = VideoReader(clip, lib=lib)
        enc = resolve_encoding(out, lib, source=reader.info)
        t0 = time.perf_counter()
        n = run_video(reader, out, lambda fr: engine.process_video(fr, batch_size=batch), encoding=enc,
                      pipelined=pipelined, queue_frames=2 * batch, progress=False)
        return (time.perf_counter() - t0) * 1e3, n, enc.describe()

    if warmup:
        once(True)
    ms: dict[str, list[float]] = {"serial": [], "pipelined": []}
    for _ in range(iters):
        for mode in ms:
            t, n, encoder = once(mode == "pipelined")
            ms[mode].append(t)
    s, p = summarize(ms["serial"]), summarize(ms["pipelined"])
    return {"encoder": encoder, "frames": n, "serial": s, "pipelined": p,
            "serial_fps": n * 1e3 / s["p50_ms"], "pipelined_fps": n * 1e3 / p["p50_ms"],
            "pipelined_speedup": s["p50_ms"] / p["p50_ms"], "raw_ms": ms}


def time_engine_only(engine, clip: str, batch: int, warmup: int, iters: int) -> dict:
    """The same engine on the clip's frames decoded beforehand into memory (no decode, no
    encode): Engine.process_video alone, so end to end minus this is the video I/O's cost."""
    from runtime.video import VideoReader

    frames = list(VideoReader(clip))
    for _ in range(min(warmup, 1)):
        list(engine.process_video(iter(frames), batch_size=batch))
    ms = []
    for _ in range(iters):
        t0 = time.perf_counter()
        list(engine.process_video(iter(frames), batch_size=batch))
        ms.append((time.perf_counter() - t0) * 1e3)
    s = summarize(ms)
    return {"latency": s, "fps": len(frames) * 1e3 / s["p50_ms"], "raw_ms": ms}


def bench_end_to_end(cfg: BenchConfig, backends: list[str], task, res: int, artifacts: str | None,
                     rows: dict) -> dict:
    """End-to-end frames/s of every sgex backend on both video libraries (module doc)."""
    from runtime.video import resolve_lib

    if task.input_kind == "mask":
        log.info("end to end: skipped for %s (a video frame is not a label map)", task.name)
        return {"skipped": f"{task.name} takes label maps, not video frames"}
    libs: dict[str, str | None] = {}
    for lib in E2E_LIBS:
        try:
            resolve_lib(lib)
            libs[lib] = None
        except SgexError as e:
            libs[lib] = str(e)
            log.warning("end to end on %s skipped: %s", lib, e)
    out: dict = {"clip": None, "batch": cfg.batch, "libs": {}, "backends": {}}
    with tempfile.TemporaryDirectory(prefix="sgex-bench-video-") as d:
        clip_lib = "av" if libs["av"] is None else "opencv"
        clip = os.path.join(d, "clip.mp4")
        out["clip"] = make_clip(clip, res // OUTPUT_SCALE, cfg.frames, cfg.seed, clip_lib)  # x1 frames
        for name in backends:
            if name == BASELINE:
                continue
            engine = _e2e_engine(cfg, name, artifacts)
            lat = rows[name]["latency"]
            entry = {"model_fps": cfg.frames * cfg.batch * 1e3 / lat["p50_ms"]}  # images per clip call
            try:
                entry["engine_only"] = time_engine_only(engine, clip, cfg.batch, cfg.warmup, cfg.iters)
                for lib, why in libs.items():
                    if why is not None:
                        entry[lib] = {"skipped": why}
                        continue
                    log.info("bucket %d: %s end to end on %s (serial and pipelined)", res, name, lib)
                    entry[lib] = time_end_to_end(engine, clip, os.path.join(d, f"out-{lib}.mp4"), lib,
                                                 cfg.batch, cfg.warmup, cfg.iters)
            finally:
                engine.close()
            out["backends"][name] = entry
    out["libs"] = {lib: why or "ok" for lib, why in libs.items()}
    return out


def format_end_to_end(e2e: dict) -> list[str]:
    if "skipped" in e2e:
        return [f"end to end: skipped ({e2e['skipped']})"]
    c = e2e["clip"]
    lines = [f"end to end (decode + model + encode, batch {e2e['batch']}), clip {c['frames']} frames "
             f"{c['size'][0]}x{c['size'][1]} {c['video']}, audio {c['audio']}:"]
    rows = [("backend", "video lib", "encoder", "serial fps", "pipelined fps", "speed-up", "engine-only fps",
             "model-only fps")]
    for name, entry in e2e["backends"].items():
        for lib in E2E_LIBS:
            r = entry.get(lib, {})
            if "skipped" in r:
                rows.append((name, lib, "skipped", "-", "-", "-", f"{entry['engine_only']['fps']:.2f}",
                             f"{entry['model_fps']:.2f}"))
                continue
            rows.append((name, lib, r["encoder"], f"{r['serial_fps']:.2f}", f"{r['pipelined_fps']:.2f}",
                         f"{r['pipelined_speedup']:.2f}x", f"{entry['engine_only']['fps']:.2f}",
                         f"{entry['model_fps']:.2f}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    lines.append("  (fps from the p50 wall time per clip; speed-up = serial p50 / pipelined p50; engine-only = "
                 "Engine.process_video on the clip's frames in memory, no decode or encode; model-only = the "
                 "backend's clip latency p50 above, graphs called directly)")
    return lines


# -- reporting ------------------------------------------------------------------------------------

def _delta_mb(memory: dict) -> str:
    d = memory.get("peak_delta_mb", memory.get("device_used_delta_mb"))
    return "-" if d is None else f"{d:+.0f}"


def format_table(result: dict) -> str:
    """The terminal table: one block per bucket, one row per backend."""
    cols = ("backend", "prec", "p50 ms", "p90 ms", "p99 ms", "mean ms", "thrpt", "speedup",
            "TFLOP/s", "peak MB", "+MB", "max|diff|", "rel", "PSNR dB", "PSNR* dB")
    lines = []
    m = result["machine"]
    lines.append(f"sgex-bench {result['config']['task']} mode={result['config']['mode']} "
                 f"device={m['device_name']} load={m['load_avg_start'][0]:.2f}")
    for run in result["runs"]:
        g = run["gflop"]
        lines.append(f"bucket {run['res']} -> output {run['output_shape'][2]}x{run['output_shape'][3]}, "
                     f"batch {run['batch']}, frames {run['frames']}: {g['per_image_sgex']:.1f} GFLOP/"
                     f"{'image' if run['mode'] == 'image' else 'frame'} "
                     f"(sgex), {g['per_image_official']:.1f} (official)")
        rows = [cols]
        for name, r in run["backends"].items():
            lat, acc = r["latency"], r["accuracy"]
            sp = r.get("speedup_vs_baseline")
            rows.append((
                name, r["precision"], f"{lat['p50_ms']:.1f}", f"{lat['p90_ms']:.1f}", f"{lat['p99_ms']:.1f}",
                f"{lat['mean_ms']:.1f}", f"{r['throughput']:.2f}", "-" if sp is None else f"{sp:.2f}x",
                f"{r['achieved_tflops']:.3f}", f"{r['memory']['peak_mb']:.0f}", _delta_mb(r["memory"]),
                "baseline" if name == BASELINE else f"{acc['max_abs_diff']:.2e}",
                "-" if name == BASELINE or acc["rel_max_abs_diff"] is None else f"{acc['rel_max_abs_diff']:.1e}",
                "-" if name == BASELINE or acc["psnr_db"] is None else f"{acc['psnr_db']:.1f}",
                "-" if name == BASELINE or acc["psnr_ref_range_db"] is None else f"{acc['psnr_ref_range_db']:.1f}"))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(cols))]
        for row in rows:
            lines.append("  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                                   for i, (v, w) in enumerate(zip(row, widths))))
        unit = next(iter(run["backends"].values()))["throughput_unit"]
        ref = next(iter(run["backends"].values()))["accuracy"]["ref_abs_max"]
        what = ("one call = style + synth of one batch" if run["mode"] == "image" else
                f"one call = a clip of {run['frames']} frames: sgex style once + synth per frame, "
                f"baseline the full recipe per frame")
        lines.append(f"({what}; thrpt in {unit}; speedup = baseline p50 / backend p50; peak MB = process "
                     f"peak during the backend, +MB = above the memory at its start; rel = max|diff| / "
                     f"max|baseline| = {ref:.3g}; PSNR peak {PSNR_PEAK:g}, PSNR* peak = the baseline's own range, "
                     f"the BF16 gate's figure)")
        if run.get("end_to_end"):
            lines.extend(format_end_to_end(run["end_to_end"]))
    faces = result.get("faces")
    if faces:
        st = faces["stages"]
        lines.append(f"face stages per frame on {faces['photo']} ({faces['frame'][1]}x{faces['frame'][0]}, crop "
                     f"{faces['crop'][1]}x{faces['crop'][0]}, paste-back frame {faces['output_frame'][1]}x"
                     f"{faces['output_frame'][0]}), p50 ms beside the model's p50 above: detect "
                     f"{st['detect']['p50_ms']:.1f}, crop/align {st['crop_align']['p50_ms']:.1f} (crop alone "
                     f"{st['crop']['p50_ms']:.1f}), paste-back {st['paste_back']['p50_ms']:.1f}")
    return "\n".join(lines)


def write_json(path: str, result: dict) -> None:
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def write_plot(path: str, result: dict) -> None:
    """Bar chart: p50 latency per backend per bucket, whiskers to p90 (matplotlib, Agg)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependency("matplotlib (for --plot)", "dev") from None
    import io

    runs = result["runs"]
    names = result["backends"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 + 0.9 * len(runs) * len(names)), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(runs))]
        p50 = [r["backends"][name]["latency"]["p50_ms"] for r in runs]
        p90 = [r["backends"][name]["latency"]["p90_ms"] for r in runs]
        ax.bar(xs, p50, width, label=name, yerr=[[0] * len(runs), [b - a for a, b in zip(p50, p90)]],
               capsize=3)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(runs))])
    ax.set_xticklabels([f"{r['res']} (x1 {r['output_shape'][2] // 4})" for r in runs])
    ax.set_xlabel("bucket = output side (x1 side)")
    per = "image batch" if result["config"]["mode"] == "image" else f"clip of {runs[0]['frames']} frames"
    ax.set_ylabel(f"ms per {per} (p50, whisker p90)")
    m = result["machine"]
    ax.set_title(f"sgex-bench {result['config']['task']} ({result['config']['mode']}, batch "
                 f"{result['config']['batch']}) on {m['device_name']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# -- CLI ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sgex-bench",
        description="Latency of sgex backends (torch, ort, trt) against the official PyTorch FP32 "
                    "recipe (torch-official), with accuracy against it, on seeded random inputs.")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--res", required=True, type=int, nargs="+",
                   help="bucket(s): the OUTPUT side, multiples of 32; each is timed at its largest "
                        "x1, res/4 x res/4")
    p.add_argument("--backends", type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
                   help=f"comma list from {','.join(BACKENDS)} (default: every available one except "
                        f"{' and '.join(TORCH_VARIANTS)}, logged)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=8, help="video mode: frames per clip (default 8)")
    p.add_argument("--iters", type=int, default=10, help="timed calls (image) or clips (video)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls per backend")
    p.add_argument("--mode", choices=MODES, default="image")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--ckpt", help="official checkpoint (.pt)")
    w.add_argument("--random-weights", action="store_true", help="random official-format weights (timing only)")
    p.add_argument("--artifacts", help="exported task directory (default: export to a temp dir)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs, noise and random weights")
    p.add_argument("--width-div", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--plan", help="precision plan JSON (sgex-calib) of the CUDA FP16 torch path "
                                  "(default: the default plan)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the torch-compile backend (default: default)")
    p.add_argument("--faces-photo", metavar="PHOTO",
                   help="also time the face stages per frame (detect, crop/align, paste-back; needs sgex[faces]) "
                        "on this photo, e.g. examples/astronaut.png")
    p.add_argument("--json", help="write the full result (atomic)")
    p.add_argument("--plot", help="write a latency chart (PNG; needs matplotlib)")
    p.add_argument("--no-end-to-end", action="store_true",
                   help="video mode: skip the decode + model + encode timing (OpenCV and PyAV, serial and pipelined)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        cfg = BenchConfig(
            task=args.task, res=tuple(args.res), backends=args.backends, batch=args.batch,
            frames=args.frames, iters=args.iters, warmup=args.warmup, mode=args.mode, ckpt=args.ckpt,
            random_weights=args.random_weights, artifacts=args.artifacts, device=args.device,
            seed=args.seed, width_div=args.width_div, faces_photo=args.faces_photo,
            command=shlex.join(["sgex-bench", *argv]), plan=args.plan, compile_mode=args.compile_mode,
            end_to_end=not args.no_end_to_end)
        result = run_benchmark(cfg)
        print(format_table(result))
        if args.json:
            write_json(args.json, result)
            log.info("wrote %s", args.json)
        if args.plot:
            write_plot(args.plot, result)
            log.info("wrote %s", args.plot)
        return 0

    return run_main("sgex-bench", body)


if __name__ == "__main__":
    sys.exit(main())

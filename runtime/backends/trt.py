"""TensorRT backend of `runtime.Engine`: one deserialized engine per manifest graph key.

What an engine entry of manifest.json promises (written by `export.engine.build_engines`):

    "engines": {"synth@128": {"file": "128/synth.engine", "sha256": "...", "onnx_sha256": "...",
                              "tensorrt": "10.9.0.34", "gpu": "NVIDIA H100 80GB HBM3",
                              "compute_capability": "9.0", "precision": "fp16",
                              "plugin": "aot" | "jit" | null,
                              "profile": {"x1": {"min": [1,3,32,32], "opt": [...], "max": [...]}, ...}}}

A TensorRT engine runs only under the TensorRT version that built it and on the GPU model it was
built for, so the backend refuses (one line, no traceback) an entry that names another TensorRT
version or GPU, an engine file whose sha256 differs, or an engine built from another export of its
ONNX graph. The remedy is always the same: rebuild on this machine with `sgex-export ... --engine`.

Execution: one CUDA stream, name-based I/O (`set_input_shape`, `set_tensor_address`,
`execute_async_v3`), float32 I/O through pinned host buffers and async copies. Device buffers are
taken from torch's CUDA caching allocator when torch with CUDA is importable (one pool with the
rest of a torch app), else from `cudaMalloc` through cuda-python; the choice is logged. Buffers
are kept per input-shape set (a video reuses one set for every frame). The CUDA device is made
current (`cudaSetDevice`) on every call: the current device is a per-thread setting, and a
server calls from its own worker threads.

CUDA graphs (`cuda_graphs=True`, for video). The TensorRT developer guide calls it undefined
behaviour to change a context's shapes or tensor addresses behind a captured graph, and
recommends one execution context per graph. So with CUDA graphs on, every input-shape set gets
its own execution context (created with the USER_MANAGED allocation strategy; all contexts of an
engine share one device-memory block of `device_memory_size_v2` bytes, which is safe because they
run one at a time on one stream), configured once with its shapes and buffer addresses and never
changed while its graph lives. The first call of a shape set runs `execute_async_v3` outside
capture (after input shapes change, TensorRT defers shape-dependent work to the first enqueue,
which must not be captured), synchronizes the stream (as trtexec does before capture: nothing of
that call may be pending), then captures a second `execute_async_v3` (cudaStreamBeginCapture /
EndCapture / GraphInstantiate); later calls replay it with cudaGraphLaunch. When capture fails
(cudaStreamEndCapture reports cudaErrorStreamCaptureInvalidated, or instantiation fails, or the
enqueue under capture fails), the partial graph is destroyed, the error is cleared with
cudaGetLastError, a warning is logged once, and that shape set runs without a graph from then on
(its results are unaffected: the call's outputs come from the ordinary enqueue). Copies stay
outside the graph. Engines whose plugin is the JIT (Python-callback) kind are not captured.
Without CUDA graphs one context per engine is reconfigured when the shape set changes.

cuda-python's major version must match the CUDA major of the TensorRT wheel and be supported by
the driver: a CUDA 13 cuda-python on a CUDA 12 driver fails every call with
cudaErrorInsufficientDriver, which is reported in one line naming the extras (`sgex[trt]` is CUDA
13, `sgex[trt-cu12]` CUDA 12).

TensorRT 10.x (>= 10.9) and 11.x; nothing here was run on a machine with TensorRT (see README).
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.backends.base import Backend
from runtime.errors import MissingDependency, SgexError, require
from runtime.manifest import Manifest

log = logging.getLogger(__name__)

EXTRA = "trt"
EXTRA_CU12 = "trt-cu12"
# cudaError_t names that mean "this cuda-python / CUDA runtime is newer than the driver".
_DRIVER_TOO_OLD = ("cudaErrorInsufficientDriver", "cudaErrorCallRequiresNewerDriver")
REBUILD_HINT = "rebuild the engines on this machine with `sgex-export ... --engine`"
MIN_TENSORRT = (10, 9)  # name-based I/O API (10.0), AOT plugins (10.9); pyproject pins the same
BUFFER_KINDS = ("auto", "torch", "cuda-python")
MAX_SHAPE_SETS = 8  # buffer sets (each with its CUDA graph) kept per graph key, least recently used dropped
IO_DTYPE = np.float32  # every graph input and output is float32 (the manifest's I/O contract)
_DIM_NAMES = {4: ("batch", "channels", "height", "width"), 3: ("batch", "rows", "style dim"),
              2: ("batch", "style dim")}


# -- optional dependencies ---------------------------------------------------------------------
def import_tensorrt():
    """The tensorrt module, or MissingDependency naming the trt extra; SgexError when too old."""
    trt = require("tensorrt", EXTRA, "TensorRT")
    if version_tuple(trt.__version__) < MIN_TENSORRT:
        raise SgexError(f"TensorRT {trt.__version__} is too old: sgex needs TensorRT >= "
                        f"{'.'.join(map(str, MIN_TENSORRT))} (pip install -c constraints.txt 'sgex[{EXTRA}]')")
    return trt


def import_cudart():
    """cuda-python's runtime module (cuda.bindings.runtime since cuda-python 12.6, cuda.cudart before)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise MissingDependency("cuda-python", EXTRA, str(e)) from None
    return cudart


def available() -> bool:
    """True when tensorrt and cuda-python import (what backend "auto" needs besides engines)."""
    try:
        import_tensorrt()
        import_cudart()
    except SgexError:
        return False
    return True


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def cuda_error_name(err) -> str:
    cudart = import_cudart()
    name = cudart.cudaGetErrorName(err)[1]
    return name.decode() if isinstance(name, bytes) else str(name)


def cuda_check(result, what: str):
    """Unwrap a cuda-python call: results are (cudaError_t, *values). A driver older than the
    CUDA runtime is an environment problem: SgexError, one line, with the remedy."""
    err, *values = result
    if int(err) != 0:
        name = cuda_error_name(err)
        if name in _DRIVER_TOO_OLD:
            raise SgexError(f"CUDA {what} failed with {name}: the NVIDIA driver is older than this "
                            f"cuda-python ({_cuda_python_version()}) needs; install the extra of "
                            f"your driver's CUDA major (pip install -c constraints.txt 'sgex[{EXTRA}]' "
                            f"for CUDA 13, 'sgex[{EXTRA_CU12}]' for CUDA 12) or update the driver")
        raise RuntimeError(f"CUDA {what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _cuda_python_version() -> str:
    from importlib import metadata

    for dist in ("cuda-python", "cuda-bindings"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "version unknown"


@dataclass(frozen=True)
class DeviceIdentity:
    """What an engine is tied to besides the TensorRT version."""

    gpu: str  # cudaDeviceProp.name, e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "major.minor", e.g. "9.0"


def device_identity(index: int = 0) -> DeviceIdentity:
    """Name and compute capability of CUDA device `index` (cuda-python)."""
    cudart = import_cudart()
    prop = cuda_check(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = prop.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode("utf-8", "replace")
    return DeviceIdentity(gpu=str(name).strip(), compute_capability=f"{prop.major}.{prop.minor}")


def device_index(device) -> int:
    """None/"auto"/"cuda" -> 0; "cuda:1" -> 1; 1 -> 1. Anything else is a user error."""
    if device is None or device == "auto":
        return 0
    if isinstance(device, int) and device >= 0:
        return device
    m = re.fullmatch(r"cuda(?::(\d+))?", str(device))
    if not m:
        raise SgexError(f"the trt backend runs on a CUDA device ('cuda' or 'cuda:N'), not {device!r}")
    return int(m.group(1) or 0)


# -- pure checks (no TensorRT; unit-tested on CPU) -----------------------------------------------
def check_engine_entry(key: str, entry: dict, graph: dict | None, *, tensorrt: str,
                       device: DeviceIdentity) -> None:
    """Refuse an engine built by another TensorRT version, for another GPU, or from another export
    of its ONNX graph. One SgexError line each, ending with how to rebuild."""
    where = f"engine {key} ({entry.get('file')})"
    built_trt = entry.get("tensorrt")
    if built_trt != tensorrt:
        raise SgexError(f"{where} was built with TensorRT {built_trt}, but this machine has TensorRT "
                        f"{tensorrt}; {REBUILD_HINT}")
    built_gpu, built_cc = entry.get("gpu"), entry.get("compute_capability")
    if (built_gpu, built_cc) != (device.gpu, device.compute_capability):
        raise SgexError(f"{where} was built for {built_gpu} (compute capability {built_cc}), but this "
                        f"machine has {device.gpu} (compute capability {device.compute_capability}); "
                        f"{REBUILD_HINT}")
    if graph is not None and entry.get("onnx_sha256") != graph.get("sha256"):
        raise SgexError(f"{where} was built from another export of {graph.get('file')} (ONNX sha256 "
                        f"differs); {REBUILD_HINT}")


def check_feeds(key: str, entry: dict, feeds: dict) -> None:
    """Names, dtype and every dimension of `feeds` against the engine's optimization profile."""
    profile = entry.get("profile") or {}
    missing = [n for n in profile if n not in feeds]
    extra = [n for n in feeds if n not in profile]
    if missing or extra:
        raise SgexError(f"{key}: engine inputs are {', '.join(profile)}; missing {missing or 'none'}, "
                        f"unexpected {extra or 'none'}")
    for name, rng in profile.items():
        a = feeds[name]
        if a.dtype != IO_DTYPE:
            raise SgexError(f"{key}: input {name} must be float32, got {a.dtype}")
        lo, hi = rng["min"], rng["max"]
        if a.ndim != len(lo):
            raise SgexError(f"{key}: input {name} must have {len(lo)} dims, got shape {tuple(a.shape)}")
        labels = _DIM_NAMES.get(a.ndim, ())
        for d, (n, mn, mx) in enumerate(zip(a.shape, lo, hi)):
            if not mn <= n <= mx:
                label = f" ({labels[d]})" if d < len(labels) else ""
                rng_s = f"{mn}" if mn == mx else f"[{mn}, {mx}]"
                raise SgexError(f"{key}: input {name} dim {d}{label} is {n}, outside the engine "
                                f"profile {rng_s}")


# -- device memory -----------------------------------------------------------------------------
class _TorchMemory:
    """Device buffers from torch's caching allocator (one pool with the rest of a torch app)."""

    kind = "torch"

    def __init__(self, index: int):
        import torch

        self._torch, self._device = torch, torch.device("cuda", index)

    def alloc(self, nbytes: int):
        t = self._torch.empty(nbytes, dtype=self._torch.uint8, device=self._device)
        return t.data_ptr(), t

    def free(self, handle) -> None:
        """Nothing to call: the block returns to torch's cache when the shape set drops the tensor
        (after the stream was synchronized, so no pending work still uses it)."""


class _CudaMemory:
    kind = "cuda-python"

    def __init__(self, index: int):
        self._cudart = import_cudart()

    def alloc(self, nbytes: int):
        ptr = cuda_check(self._cudart.cudaMalloc(nbytes), "cudaMalloc")
        return int(ptr), int(ptr)

    def free(self, handle) -> None:
        cuda_check(self._cudart.cudaFree(handle), "cudaFree")


def _pick_memory(kind: str, index: int):
    if kind not in BUFFER_KINDS:
        raise SgexError(f"unknown buffer kind {kind!r} (choose from: {', '.join(BUFFER_KINDS)})")
    if kind == "auto":
        try:
            import torch

            has_torch_cuda = torch.cuda.is_available()
        except ImportError:
            has_torch_cuda = False
        kind = "torch" if has_torch_cuda else "cuda-python"
        log.info("trt backend: device buffers from %s (%s)", kind,
                 "torch with CUDA is present" if has_torch_cuda else "no torch with CUDA")
    if kind == "torch":
        torch = require("torch", "torch", "PyTorch")
        if not torch.cuda.is_available():
            raise SgexError("buffers='torch' needs a CUDA build of torch; use buffers='cuda-python'")
        return _TorchMemory(index)
    return _CudaMemory(index)


def _is_null(handle) -> bool:
    """A cuda-python handle (or a fake's) that points at nothing."""
    if handle is None:
        return True
    try:
        return int(handle) == 0
    except TypeError:
        return False


@dataclass
class _ShapeSet:
    """Buffers for one set of input shapes; with CUDA graphs also its own execution context, its
    graph, or the note that capture failed for it."""

    shapes: dict  # name -> shape, inputs and outputs
    device: dict = field(default_factory=dict)  # name -> (device ptr, allocator handle)
    host: dict = field(default_factory=dict)  # name -> (pinned host ptr, numpy view)
    context: object = None  # CUDA graphs only: configured once, never changed while the graph lives
    graph_exec: object = None
    graph_failed: bool = False  # capture failed once: this set runs without a graph


@dataclass
class _Loaded:
    key: str
    entry: dict
    engine: object
    inputs: list
    outputs: list
    context: object = None  # without CUDA graphs: the one context, reconfigured per shape set
    scratch: tuple | None = None  # with CUDA graphs: (ptr, handle, nbytes) shared by the contexts
    shape_sets: OrderedDict = field(default_factory=OrderedDict)
    current: tuple | None = None  # the shape-set key `context` is configured for


class TrtBackend(Backend):
    """Backend "trt": runs the TensorRT engines listed in a task directory's manifest.

    TrtBackend(artifacts_dir, manifest=None, device=None | "cuda" | "cuda:N", *, cuda_graphs=False,
    buffers="auto" | "torch" | "cuda-python"). Construction checks every engine entry against this
    machine (TensorRT version, GPU, ONNX hash); each engine is read, hash-checked and deserialized
    on its first `run`. feeds/results of `run` are float32 numpy arrays in the layouts of the
    manifest graphs (runtime/backends/base.py)."""

    name = "trt"

    def __init__(self, artifacts_dir, manifest: Manifest | None = None, device=None, *,
                 cuda_graphs: bool = False, buffers: str = "auto"):
        self.dir = Path(artifacts_dir)
        self.manifest = manifest if manifest is not None else Manifest.load(self.dir)
        self._trt = import_tensorrt()
        self._cudart = import_cudart()
        if not self.manifest.engines:
            raise SgexError(f"{self.dir}: the manifest lists no TensorRT engines; build them with "
                            f"`sgex-export ... --engine`")
        self.index = device_index(device)
        self._make_device_current()
        self.identity = device_identity(self.index)
        self.tensorrt_version = self._trt.__version__
        for key, entry in self.manifest.engines.items():
            check_engine_entry(key, entry, self.manifest.graphs.get(key),
                               tensorrt=self.tensorrt_version, device=self.identity)
        self.cuda_graphs = bool(cuda_graphs)
        if self.cuda_graphs:
            jit = sorted(k for k, e in self.manifest.engines.items() if e.get("plugin") == "jit")
            if jit:
                raise SgexError(f"CUDA graphs cannot capture the JIT plugin (Python callbacks) of "
                                f"{', '.join(jit)}; export with the AOT plugin or run without CUDA graphs")
        self._memory = _pick_memory(buffers, self.index)
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self._runtime = self._trt.Runtime(self._logger)
        self._stream = cuda_check(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._loaded: dict[str, _Loaded] = {}
        self._plugin_registered = False

    # -- Backend interface ------------------------------------------------------------------------
    def describe(self) -> str:
        return (f"TensorRT {self.tensorrt_version} on {self.identity.gpu} (compute capability "
                f"{self.identity.compute_capability}), {self._memory.kind} buffers, CUDA graphs "
                f"{'on' if self.cuda_graphs else 'off'}")

    def run(self, key: str, feeds: dict) -> dict:
        """feeds: name -> float32 array (shapes inside the engine profile) -> outputs by name."""
        self._make_device_current()
        g = self._load(key)
        check_feeds(key, g.entry, feeds)
        arrays = {n: np.ascontiguousarray(feeds[n]) for n in g.inputs}
        set_key = tuple((n, arrays[n].shape) for n in g.inputs)
        ss = self._shape_set(g, set_key, arrays)
        if self.cuda_graphs:
            ctx = ss.context
        else:
            if g.current != set_key:
                self._configure(g, set_key, ss)
            ctx = g.context

        cudart, stream = self._cudart, self._stream
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n in g.inputs:
            hptr, hview = ss.host[n]
            np.copyto(hview, arrays[n])
            cuda_check(cudart.cudaMemcpyAsync(ss.device[n][0], hptr, hview.nbytes, h2d, stream),
                       "cudaMemcpyAsync (host to device)")
        if not self.cuda_graphs or ss.graph_failed:
            self._execute(g, ctx)
        elif ss.graph_exec is None:
            self._execute(g, ctx)  # the once-outside-capture enqueue TensorRT requires; its results are this call's
            ss.graph_exec = self._capture(g, ss)
        else:
            cuda_check(cudart.cudaGraphLaunch(ss.graph_exec, stream), "cudaGraphLaunch")
        for n in g.outputs:
            hptr, hview = ss.host[n]
            cuda_check(cudart.cudaMemcpyAsync(hptr, ss.device[n][0], hview.nbytes, d2h, stream),
                       "cudaMemcpyAsync (device to host)")
        cuda_check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return {n: ss.host[n][1].copy() for n in g.outputs}

    def close(self) -> None:
        """Free every buffer, context, CUDA graph and the stream (the backend is unusable afterwards)."""
        if self._stream is None:
            return
        self._make_device_current()
        for g in self._loaded.values():
            while g.shape_sets:
                self._release(g, g.shape_sets.popitem(last=False)[1])
            g.context = None
            if g.scratch is not None:
                self._memory.free(g.scratch[1])
                g.scratch = None
        self._loaded.clear()
        cuda_check(self._cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
        self._stream = None

    def _make_device_current(self) -> None:
        """cudaSetDevice is per host thread: set it on every call (cheap), whichever thread calls."""
        cuda_check(self._cudart.cudaSetDevice(self.index), "cudaSetDevice")

    # -- loading ----------------------------------------------------------------------------------
    def _load(self, key: str) -> _Loaded:
        if key in self._loaded:
            return self._loaded[key]
        entry = self.manifest.engines.get(key)
        if entry is None:
            have = ", ".join(sorted(self.manifest.engines)) or "none"
            raise SgexError(f"{self.dir}: no TensorRT engine for graph {key} (engines: {have}); "
                            f"build it with `sgex-export ... --engine`")
        path = self.dir / entry["file"]
        try:  # deserialized from exactly the bytes that were hashed
            data = self.manifest.read_verified(self.dir, key, kind="engine")
        except SgexError as e:
            raise SgexError(f"{e}; {REBUILD_HINT}") from None
        if entry.get("plugin") == "jit":
            self._register_plugin()
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise SgexError(f"{path}: TensorRT could not deserialize the engine (see the TensorRT "
                            f"log above); {REBUILD_HINT}")
        trt = self._trt
        inputs, outputs = [], []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = engine.get_tensor_dtype(name)
            if dtype != trt.DataType.FLOAT:
                raise SgexError(f"{path}: tensor {name} is {dtype}; sgex engines have float32 I/O; "
                                f"{REBUILD_HINT}")
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
        if sorted(inputs) != sorted(entry.get("profile", {})):
            raise SgexError(f"{path}: engine inputs {inputs} differ from the manifest profile "
                            f"{list(entry.get('profile', {}))}; {REBUILD_HINT}")
        g = _Loaded(key, entry, engine, inputs, outputs)
        if self.cuda_graphs:
            nbytes = max(int(engine.device_memory_size_v2), 1)
            ptr, handle = self._memory.alloc(nbytes)
            g.scratch = (ptr, handle, nbytes)
        else:
            g.context = self._new_context(g)
        log.info("trt backend: loaded %s (%s, plugin %s)", path, entry.get("precision"), entry.get("plugin"))
        self._loaded[key] = g
        return g

    def _new_context(self, g: _Loaded):
        """An execution context: TensorRT-allocated without CUDA graphs; with them, on the
        engine's shared user-managed device memory."""
        if g.scratch is None:
            ctx = g.engine.create_execution_context()
        else:
            ctx = g.engine.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is not None:
                ctx.set_device_memory(g.scratch[0], g.scratch[2])
        if ctx is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {g.key} (out of GPU memory?)")
        return ctx

    def _register_plugin(self) -> None:
        """The JIT plugin's Python implementation must be registered before deserialization."""
        if not self._plugin_registered:
            from kernels import trt_plugin

            try:
                trt_plugin.require_jit_runtime()
                trt_plugin.register()
            except trt_plugin.PluginUnavailable as e:
                raise SgexError(str(e)) from None
            self._plugin_registered = True

    # -- buffers, shapes, execution -----------------------------------------------------------------
    def _shape_set(self, g: _Loaded, set_key: tuple, arrays: dict) -> _ShapeSet:
        ss = g.shape_sets.get(set_key)
        if ss is not None:
            g.shape_sets.move_to_end(set_key)
            return ss
        if len(g.shape_sets) >= MAX_SHAPE_SETS:
            self._release(g, g.shape_sets.popitem(last=False)[1])
        if self.cuda_graphs:
            ctx = self._new_context(g)
        else:
            ctx = g.context
            g.current = None  # shapes change below; _configure sets them again with the addresses
        shapes = {n: tuple(arrays[n].shape) for n in g.inputs}
        self._set_shapes(g, ctx, shapes)
        for n in g.outputs:
            shape = tuple(ctx.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{g.key}: TensorRT could not infer the shape of output {n} ({shape})")
            shapes[n] = shape
        ss = _ShapeSet(shapes)
        for n, shape in shapes.items():
            nbytes = int(np.prod(shape)) * IO_DTYPE().itemsize
            ss.device[n] = self._memory.alloc(nbytes)
            hptr = int(cuda_check(self._cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
            raw = (ctypes.c_uint8 * nbytes).from_address(hptr)
            ss.host[n] = (hptr, np.frombuffer(raw, dtype=IO_DTYPE).reshape(shape))
        if self.cuda_graphs:
            self._set_addresses(g, ctx, ss)
            ss.context = ctx
        g.shape_sets[set_key] = ss
        return ss

    @staticmethod
    def _set_shapes(g: _Loaded, ctx, shapes: dict) -> None:
        for n in g.inputs:
            if not ctx.set_input_shape(n, shapes[n]):
                raise SgexError(f"{g.key}: TensorRT rejected input {n} of shape {shapes[n]}")

    @staticmethod
    def _set_addresses(g: _Loaded, ctx, ss: _ShapeSet) -> None:
        for n in g.inputs + g.outputs:
            if not ctx.set_tensor_address(n, ss.device[n][0]):
                raise RuntimeError(f"{g.key}: TensorRT rejected the address of tensor {n}")

    def _configure(self, g: _Loaded, set_key: tuple, ss: _ShapeSet) -> None:
        """Without CUDA graphs: point the engine's one context at a shape set."""
        self._set_shapes(g, g.context, ss.shapes)
        self._set_addresses(g, g.context, ss)
        g.current = set_key

    def _execute(self, g: _Loaded, ctx) -> None:
        if not ctx.execute_async_v3(int(self._stream)):
            raise RuntimeError(f"{g.key}: TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def _capture(self, g: _Loaded, ss: _ShapeSet):
        """Capture the shape set's enqueue into a CUDA graph; None (and ss.graph_failed, logged
        once) when capture fails, after destroying what was captured and clearing the error."""
        cudart, stream = self._cudart, self._stream
        cuda_check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize (before capture)")
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda_check(cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
        ok = ss.context.execute_async_v3(int(stream))
        err, graph = cudart.cudaStreamEndCapture(stream)  # always end the capture, even after a failure
        why = None if int(err) == 0 else cuda_error_name(err)
        if why is None and not ok:
            why = "execute_async_v3 failed under capture"
        graph_exec = None
        if why is None:
            err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
            if int(err) != 0:
                why, graph_exec = f"cudaGraphInstantiate: {cuda_error_name(err)}", None
        if not _is_null(graph):
            cudart.cudaGraphDestroy(graph)  # the executable graph, if any, no longer needs it
        if why is None:
            return graph_exec
        cudart.cudaGetLastError()  # clear the capture error so later calls do not report it
        ss.graph_failed = True
        log.warning("trt backend: CUDA graph capture failed for %s with shapes %s (%s); this shape "
                    "set runs without a CUDA graph", g.key, ss.shapes, why)
        return None

    def _release(self, g: _Loaded, ss: _ShapeSet) -> None:
        cudart = self._cudart
        cuda_check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        if ss.graph_exec is not None:
            cuda_check(cudart.cudaGraphExecDestroy(ss.graph_exec), "cudaGraphExecDestroy")
            ss.graph_exec = None
        ss.context = None  # TensorRT destroys the context with its last reference
        for _, handle in ss.device.values():
            self._memory.free(handle)
        for hptr, _ in ss.host.values():
            cuda_check(cudart.cudaFreeHost(hptr), "cudaFreeHost")
        ss.device.clear()
        ss.host.clear()
        if g.current is not None and g.current not in g.shape_sets:
            g.current = None

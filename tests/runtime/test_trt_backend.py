"""runtime/backends/trt.py.

CPU (default run): the manifest compatibility checks (TensorRT version, GPU, sha256, stale ONNX),
the profile check of feeds, the missing-dependency message, and the backend's own control flow
(shape sets, pinned copies, one execution context per shape set under CUDA graphs on shared
user-managed memory, synchronize-then-capture order and replay, the capture-failure path, LRU
release, the driver-too-old message, cudaSetDevice on a worker thread) against an in-process fake
of the tensorrt and cuda-python modules that follows the documented CUDA semantics (see
_FakeCudart). The fake checks sgex's bookkeeping only; it says nothing about TensorRT itself.

`trt` marker (skips without TensorRT): the real thing end to end: export a small bucket of a tiny
random checkpoint in FP16, build the engine, run it through runtime.Engine(backend="trt"), compare
with ONNX Runtime on the same ONNX (PSNR >= 35 dB); the same with the plugin flavor; CUDA-graph
replay against plain runs; refusal of an engine of another GPU. Run them on a machine with an
NVIDIA GPU and TensorRT: `pytest -m trt tests/runtime/test_trt_backend.py` (each case exports a
tiny checkpoint first: about 2 minutes on CPU).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import sys
import threading
import types

import numpy as np
import pytest

from runtime.backends import trt as tb
from runtime.errors import MissingDependency, SgexError
from runtime.manifest import Manifest

TRT_VERSION = "10.9.0.34"
GPU, CC = "NVIDIA Fake GPU", "9.0"
D = 128  # the style dim of a width_div=4 model (a manifest refuses other sizes)
ENTRY = {"file": "128/synth.engine", "sha256": "ab" * 32, "onnx_sha256": "cd" * 32, "tensorrt": TRT_VERSION,
         "gpu": GPU, "compute_capability": CC, "precision": "fp16", "plugin": None,
         "profile": {"x1": {"min": [1, 3, 32, 32], "opt": [1, 3, 128, 128], "max": [2, 3, 128, 128]},
                     "wplus": {"min": [1, 18, D], "opt": [1, 18, D], "max": [2, 18, D]}}}
GRAPH = {"file": "128/synth.onnx", "sha256": "cd" * 32}
HERE = tb.DeviceIdentity(GPU, CC)


# -- compatibility checks ---------------------------------------------------------------------------
def _one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(SgexError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "sgex-export" in msg and "--engine" in msg
    return msg


def test_entry_matching_machine_passes():
    tb.check_engine_entry("synth@128", ENTRY, GRAPH, tensorrt=TRT_VERSION, device=HERE)


def test_tensorrt_version_mismatch():
    msg = _one_line_error(tb.check_engine_entry, "synth@128", ENTRY, GRAPH, tensorrt="11.0.0.7", device=HERE)
    assert "built with TensorRT 10.9.0.34" in msg and "has TensorRT 11.0.0.7" in msg


def test_gpu_mismatch():
    msg = _one_line_error(tb.check_engine_entry, "synth@128", ENTRY, GRAPH, tensorrt=TRT_VERSION,
                          device=tb.DeviceIdentity("NVIDIA L4", "8.9"))
    assert "built for NVIDIA Fake GPU (compute capability 9.0)" in msg and "NVIDIA L4 (compute capability 8.9)" in msg
    # same architecture, another model: still refused (engines are tuned per GPU model)
    _one_line_error(tb.check_engine_entry, "synth@128", ENTRY, GRAPH, tensorrt=TRT_VERSION,
                    device=tb.DeviceIdentity("NVIDIA H200", CC))


def test_hash_mismatch(tmp_path):
    """Engine bytes are read once and checked (Manifest.read_verified, what the backend loads)."""
    from runtime.manifest import Manifest

    data = b"serialized plan"
    m = Manifest({"task": "superres", "engines": {"synth@128": {**ENTRY, "file": "synth.plan",
                                                                "sha256": hashlib.sha256(data).hexdigest()}}})
    (tmp_path / "synth.plan").write_bytes(data)
    assert m.read_verified(tmp_path, "synth@128", kind="engine") == data
    (tmp_path / "synth.plan").write_bytes(data + b"!")
    with pytest.raises(SgexError, match=r"sha256 does not match the manifest \(engine synth@128\)"):
        m.read_verified(tmp_path, "synth@128", kind="engine")


def test_stale_onnx():
    msg = _one_line_error(tb.check_engine_entry, "synth@128", ENTRY, {**GRAPH, "sha256": "ef" * 32},
                          tensorrt=TRT_VERSION, device=HERE)
    assert "another export of 128/synth.onnx" in msg


def test_check_feeds_names_the_dimension():
    x1 = np.zeros((1, 3, 64, 96), np.float32)
    w = np.zeros((1, 18, D), np.float32)
    tb.check_feeds("synth@128", ENTRY, {"x1": x1, "wplus": w})
    with pytest.raises(SgexError, match=r"x1 dim 3 \(width\) is 160, outside the engine profile \[32, 128\]"):
        tb.check_feeds("synth@128", ENTRY, {"x1": np.zeros((1, 3, 64, 160), np.float32), "wplus": w})
    with pytest.raises(SgexError, match=r"x1 dim 0 \(batch\) is 3"):
        tb.check_feeds("synth@128", ENTRY, {"x1": np.zeros((3, 3, 64, 64), np.float32), "wplus": np.zeros((3, 18, D), np.float32)})
    with pytest.raises(SgexError, match=rf"wplus dim 2 .* is 9, outside the engine profile {D}"):
        tb.check_feeds("synth@128", ENTRY, {"x1": x1, "wplus": np.zeros((1, 18, 9), np.float32)})
    with pytest.raises(SgexError, match="must be float32"):
        tb.check_feeds("synth@128", ENTRY, {"x1": x1.astype(np.float16), "wplus": w})
    with pytest.raises(SgexError, match=r"missing \['wplus'\]"):
        tb.check_feeds("synth@128", ENTRY, {"x1": x1})


def test_device_index():
    assert [tb.device_index(d) for d in (None, "auto", "cuda", "cuda:2", 1)] == [0, 0, 0, 2, 1]
    with pytest.raises(SgexError, match="CUDA device"):
        tb.device_index("cpu")


# -- without TensorRT ---------------------------------------------------------------------------------
def _manifest(engines=None) -> Manifest:
    m = Manifest.new(task="toonify", variant="pixar", precision="fp16", flavor="portable", noise="zero",
                     style_dim=D, n_latent=18, inputs={}, versions={},
                     checkpoint={"file": None, "sha256": None, "random": True, "seed": 0})
    m.graphs["synth@128"] = {**GRAPH, "bucket": {"side": 128, "max_batch": 2}, "graph": "synth",
                             "inputs": [{"name": "x1"}, {"name": "wplus"}], "outputs": [{"name": "y"}]}
    m.engines.update(engines if engines is not None else {"synth@128": ENTRY})
    return m


def test_backend_without_tensorrt_names_the_extra(no_tensorrt, tmp_path):
    from runtime.backends import create

    with pytest.raises(MissingDependency) as e:
        create("trt", tmp_path, _manifest(), None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("TensorRT is not installed (pip install -c constraints.txt 'sgex[trt]')")
    assert not tb.available()


def test_missing_cuda_python_names_the_extra(no_tensorrt):
    with pytest.raises(MissingDependency, match=r"cuda-python is not installed .*'sgex\[trt\]'"):
        tb.import_cudart()


# -- backend control flow against a fake tensorrt + cuda-python --------------------------------------
class _FakeCudart(types.ModuleType):
    """Host memory stands in for device memory; capture records the context's work as closures
    with the addresses of capture time (as a CUDA graph bakes its kernel arguments).

    Documented CUDA semantics it follows: the current device is per host thread (cudaSetDevice);
    a capture that was invalidated makes cudaStreamEndCapture return
    cudaErrorStreamCaptureInvalidated and no graph, and leaves that error for cudaGetLastError,
    which returns and clears it. `pending` counts work queued since the last synchronize."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 1

    ERRORS = {0: b"cudaSuccess", 35: b"cudaErrorInsufficientDriver", 901: b"cudaErrorStreamCaptureInvalidated"}

    def __init__(self):
        super().__init__("cuda.bindings.runtime")
        self.mem, self.capturing, self.recorded, self.launches = {}, False, None, 0
        self.mallocs = self.frees = 0
        self.invalidated, self.last_error, self.pending = False, 0, 0
        self.begin_captures, self.pending_at_capture = 0, []
        self.device_of_thread, self.set_device_result = {}, 0

    def _need_device(self):
        assert threading.get_ident() in self.device_of_thread, "CUDA call before cudaSetDevice on this thread"

    def _alloc(self, n):
        self._need_device()
        buf = ctypes.create_string_buffer(n)
        self.mem[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaGetDeviceProperties(self, i):
        return 0, types.SimpleNamespace(name=GPU.encode() + b"\0\0", major=9, minor=0)

    def cudaSetDevice(self, i):
        if self.set_device_result == 0:
            self.device_of_thread[threading.get_ident()] = i
        return (self.set_device_result,)

    def cudaStreamCreate(self):
        return 0, 77

    def cudaStreamDestroy(self, s):
        return (0,)

    def cudaMalloc(self, n):
        self.mallocs += 1
        return self._alloc(n)

    cudaMallocHost = _alloc

    def cudaFree(self, p):
        self.frees += 1
        del self.mem[p]
        return (0,)

    def cudaFreeHost(self, p):
        del self.mem[p]
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        self._need_device()
        assert not self.capturing, "copies must stay outside the CUDA graph"
        assert dst in self.mem and src in self.mem
        ctypes.memmove(dst, src, n)
        self.pending += 1
        return (0,)

    def cudaStreamSynchronize(self, s):
        self.pending = 0
        return (0,)

    def cudaStreamBeginCapture(self, s, mode):
        self.capturing, self.recorded, self.invalidated = True, [], False
        self.begin_captures += 1
        self.pending_at_capture.append(self.pending)
        return (0,)

    def cudaStreamEndCapture(self, s):
        self.capturing = False
        if self.invalidated:
            self.last_error = 901
            return 901, None
        return 0, self.recorded

    def cudaGetLastError(self):
        err, self.last_error = self.last_error, 0
        return (err,)

    def cudaGraphInstantiate(self, graph, flags):
        return 0, list(graph)

    def cudaGraphLaunch(self, exe, s):
        self.launches += 1
        self.pending += 1
        for op in exe:
            op()
        return (0,)

    def cudaGraphDestroy(self, g):
        assert g is not None
        return (0,)

    def cudaGraphExecDestroy(self, g):
        return (0,)

    def cudaGetErrorName(self, err):
        return 0, self.ERRORS.get(int(err), b"cudaErrorFake")


def _view(ptr, shape):
    n = int(np.prod(shape)) * 4
    return np.frombuffer((ctypes.c_uint8 * n).from_address(ptr), dtype=np.float32).reshape(shape)


def _compute(x1, w):
    """The fake engine's graph: y [B,3,4H,4W] = 4x nearest upsample of x1 + sum of wplus."""
    return np.repeat(np.repeat(x1, 4, axis=2), 4, axis=3) + w.sum(axis=(1, 2))[:, None, None, None]


class _FakeContext:
    def __init__(self, engine, strategy):
        self.cudart, self.engine, self.strategy = engine.cudart, engine, strategy
        self.shapes, self.addr, self.flushed, self.executes = {}, {}, True, 0
        self.device_memory, self.captured, self.changed_after_capture = None, False, 0

    def set_device_memory(self, ptr, size):
        assert self.strategy == "user_managed" and size >= self.engine.device_memory_size_v2
        self.device_memory = ptr

    def set_input_shape(self, name, shape):
        self.changed_after_capture += self.captured
        self.shapes[name], self.flushed = tuple(shape), False
        return True

    def get_tensor_shape(self, name):
        b, c, h, w = self.shapes["x1"]
        return (b, c, 4 * h, 4 * w)

    def set_tensor_address(self, name, ptr):
        self.changed_after_capture += self.captured
        self.addr[name] = ptr
        return True

    def execute_async_v3(self, stream):
        assert self.strategy != "user_managed" or self.device_memory is not None
        if self.cudart.capturing and not self.flushed:
            return False  # TensorRT: enqueue once outside capture after a shape change
        shapes, addr = dict(self.shapes), dict(self.addr)
        yshape = self.get_tensor_shape("y")

        def op():
            _view(addr["y"], yshape)[...] = _compute(_view(addr["x1"], shapes["x1"]), _view(addr["wplus"], shapes["wplus"]))

        if self.cudart.capturing:
            self.captured = True
            if self.engine.breaks_capture(shapes):
                self.cudart.invalidated = True  # e.g. a synchronizing call inside the enqueue
            self.cudart.recorded.append(op)
        else:
            self.executes += 1
            self.flushed = True
            self.cudart.pending += 1
            op()
        return True


class _FakeEngine:
    names = ("x1", "wplus", "y")
    device_memory_size_v2 = 4096

    def __init__(self, cudart):
        self.cudart, self.contexts = cudart, []
        self.num_io_tensors = 3
        self.breaks_capture = lambda shapes: False

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_dtype(self, name):
        return "float"

    def get_tensor_mode(self, name):
        return "in" if name != "y" else "out"

    def create_execution_context(self, strategy="static"):
        self.contexts.append(_FakeContext(self, strategy))
        return self.contexts[-1]


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    cudart = _FakeCudart()
    engines = []
    trt = types.ModuleType("tensorrt")
    trt.__version__ = TRT_VERSION
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, sev: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.DataType = types.SimpleNamespace(FLOAT="float", HALF="half")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(STATIC="static", USER_MANAGED="user_managed")

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            assert json.loads(bytes(data)) == {"fake": "engine"}
            engines.append(_FakeEngine(cudart))
            return engines[-1]

    trt.Runtime = Runtime
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, cudart
    for name, mod in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, mod)

    data = json.dumps({"fake": "engine"}).encode()
    (tmp_path / "128").mkdir()
    (tmp_path / "128" / "synth.engine").write_bytes(data)
    entry = {**ENTRY, "sha256": hashlib.sha256(data).hexdigest()}
    return types.SimpleNamespace(cudart=cudart, engines=engines, dir=tmp_path, manifest=_manifest({"synth@128": entry}))


def _feeds(rng, b, h, w):
    return {"x1": rng.standard_normal((b, 3, h, w)).astype(np.float32),
            "wplus": rng.standard_normal((b, 18, D)).astype(np.float32)}


def test_fake_run_reuses_buffers_per_shape(fake_trt):
    rng = np.random.default_rng(0)
    be = tb.TrtBackend(fake_trt.dir, fake_trt.manifest, "cuda", buffers="cuda-python")
    assert "TensorRT 10.9.0.34 on NVIDIA Fake GPU" in be.describe() and "CUDA graphs off" in be.describe()
    for b, h, w in [(1, 64, 96), (1, 64, 96), (2, 32, 128), (1, 64, 96)]:
        f = _feeds(rng, b, h, w)
        out = be.run("synth@128", f)
        np.testing.assert_array_equal(out["y"], _compute(f["x1"], f["wplus"]))
    assert fake_trt.cudart.mallocs == 6  # two shape sets x (x1, wplus, y)
    with pytest.raises(SgexError, match=r"dim 2 \(height\) is 160"):
        be.run("synth@128", _feeds(rng, 1, 160, 32))
    with pytest.raises(SgexError, match="no TensorRT engine for graph style"):
        be.run("style", {})
    be.close()
    assert fake_trt.cudart.frees == 6 and not fake_trt.cudart.mem


def test_fake_run_without_graphs_uses_one_context(fake_trt):
    rng = np.random.default_rng(6)
    with tb.TrtBackend(fake_trt.dir, fake_trt.manifest, None, buffers="cuda-python") as be:
        for b, h, w in [(1, 64, 64), (2, 32, 96), (1, 64, 64)]:
            f = _feeds(rng, b, h, w)
            np.testing.assert_array_equal(be.run("synth@128", f)["y"], _compute(f["x1"], f["wplus"]))
    (eng,) = fake_trt.engines
    assert [c.strategy for c in eng.contexts] == ["static"] and eng.contexts[0].executes == 3


def test_fake_cuda_graphs_one_context_per_shape_set(fake_trt):
    rng = np.random.default_rng(1)
    be = tb.TrtBackend(fake_trt.dir, fake_trt.manifest, None, cuda_graphs=True, buffers="cuda-python")
    shapes = [(1, 64, 64), (1, 64, 64), (2, 32, 96), (1, 64, 64), (2, 32, 96), (1, 64, 64)]
    for b, h, w in shapes:
        f = _feeds(rng, b, h, w)
        np.testing.assert_array_equal(be.run("synth@128", f)["y"], _compute(f["x1"], f["wplus"]))
    cudart, (eng,) = fake_trt.cudart, fake_trt.engines
    assert len(eng.contexts) == 2  # one per shape set
    assert {c.strategy for c in eng.contexts} == {"user_managed"}
    assert len({c.device_memory for c in eng.contexts}) == 1  # one shared block
    assert [c.executes for c in eng.contexts] == [1, 1]  # the ordinary enqueue before each capture
    assert [c.changed_after_capture for c in eng.contexts] == [0, 0]  # never reconfigured behind a graph
    assert cudart.begin_captures == 2 and cudart.pending_at_capture == [0, 0]  # synchronized first
    assert cudart.launches == 4  # every later call replays its shape set's graph
    be.close()
    assert not cudart.mem  # buffers and the shared block freed


def test_fake_capture_failure_runs_without_graph_logged_once(fake_trt, caplog):
    rng = np.random.default_rng(7)
    cudart, broken = fake_trt.cudart, (1, 3, 32, 96)
    be = tb.TrtBackend(fake_trt.dir, fake_trt.manifest, None, cuda_graphs=True, buffers="cuda-python")
    be._load("synth@128").engine.breaks_capture = lambda shapes: shapes["x1"] == broken
    with caplog.at_level(logging.WARNING, logger=tb.__name__):
        for b, h, w in [(1, 32, 96), (1, 64, 64), (1, 32, 96), (1, 32, 96), (1, 64, 64)]:
            f = _feeds(rng, b, h, w)
            np.testing.assert_array_equal(be.run("synth@128", f)["y"], _compute(f["x1"], f["wplus"]))
            assert cudart.last_error == 0  # the capture error was cleared
    warnings = [r.getMessage() for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(warnings) == 1 and "cudaErrorStreamCaptureInvalidated" in warnings[0] and "32, 96" in warnings[0]
    assert cudart.begin_captures == 2  # the failed shape set is not captured again
    ctx_broken, ctx_ok = fake_trt.engines[0].contexts
    assert ctx_broken.executes == 3 and ctx_ok.executes == 1  # graph-less runs vs one enqueue + replay
    assert cudart.launches == 1
    be.close()


def test_fake_driver_too_old_is_one_line(fake_trt):
    fake_trt.cudart.set_device_result = 35
    with pytest.raises(SgexError) as e:
        tb.TrtBackend(fake_trt.dir, fake_trt.manifest, None, buffers="cuda-python")
    msg = str(e.value)
    assert "\n" not in msg and "cudaErrorInsufficientDriver" in msg
    assert "'sgex[trt]' for CUDA 13" in msg and "'sgex[trt-cu12]' for CUDA 12" in msg


def test_fake_run_from_another_thread_sets_the_device(fake_trt):
    rng = np.random.default_rng(8)
    be = tb.TrtBackend(fake_trt.dir, fake_trt.manifest, "cuda:1", buffers="cuda-python")
    f, out, errors = _feeds(rng, 1, 32, 32), {}, []

    def work():
        try:
            out.update(be.run("synth@128", f))
        except Exception as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors, errors
    np.testing.assert_array_equal(out["y"], _compute(f["x1"], f["wplus"]))
    assert fake_trt.cudart.device_of_thread[t.ident] == 1
    be.close()


def test_fake_lru_releases_old_shape_sets(fake_trt, monkeypatch):
    monkeypatch.setattr(tb, "MAX_SHAPE_SETS", 2)
    rng = np.random.default_rng(2)
    be = tb.TrtBackend(fake_trt.dir, fake_trt.manifest, None, cuda_graphs=True, buffers="cuda-python")
    for b, h, w in [(1, 32, 32), (1, 64, 64), (1, 96, 96), (1, 32, 32)]:
        f = _feeds(rng, b, h, w)
        np.testing.assert_array_equal(be.run("synth@128", f)["y"], _compute(f["x1"], f["wplus"]))
    assert fake_trt.cudart.frees == 6  # (32) dropped for (96), then (64) dropped for (32) again
    be.close()


def test_fake_refuses_foreign_engines(fake_trt, monkeypatch):
    m = fake_trt.manifest
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "10.12.0.36")
    with pytest.raises(SgexError, match="built with TensorRT 10.9.0.34, but this machine has TensorRT 10.12.0.36"):
        tb.TrtBackend(fake_trt.dir, m, None, buffers="cuda-python")
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", TRT_VERSION)
    (fake_trt.dir / "128" / "synth.engine").write_bytes(b"tampered")
    be = tb.TrtBackend(fake_trt.dir, m, None, buffers="cuda-python")
    with pytest.raises(SgexError, match="sha256 does not match the manifest"):
        be.run("synth@128", _feeds(np.random.default_rng(3), 1, 32, 32))
    be.close()


def test_fake_refuses_half_io(fake_trt, monkeypatch):
    monkeypatch.setattr(_FakeEngine, "get_tensor_dtype", lambda self, name: "half" if name == "y" else "float")
    with tb.TrtBackend(fake_trt.dir, fake_trt.manifest, None, buffers="cuda-python") as be:
        with pytest.raises(SgexError, match="tensor y is half; sgex engines have float32 I/O"):
            be.run("synth@128", _feeds(np.random.default_rng(4), 1, 32, 32))


def test_fake_jit_plugin_registers_before_deserializing(fake_trt, monkeypatch):
    from kernels import trt_plugin

    fake_trt.manifest.engines["synth@128"]["plugin"] = "jit"
    with pytest.raises(SgexError, match="CUDA graphs cannot capture the JIT plugin .* of synth@128"):
        tb.TrtBackend(fake_trt.dir, fake_trt.manifest, None, cuda_graphs=True, buffers="cuda-python")
    order = []
    monkeypatch.setattr(trt_plugin, "register", lambda: order.append("register"))
    monkeypatch.setattr(trt_plugin, "require_jit_runtime", lambda: order.append("jit deps"))
    real = sys.modules["tensorrt"].Runtime.deserialize_cuda_engine
    monkeypatch.setattr(sys.modules["tensorrt"].Runtime, "deserialize_cuda_engine",
                        lambda self, data: order.append("deserialize") or real(self, data))
    with tb.TrtBackend(fake_trt.dir, fake_trt.manifest, None, buffers="cuda-python") as be:
        be.run("synth@128", _feeds(np.random.default_rng(5), 1, 32, 32))
    assert order == ["jit deps", "register", "deserialize"]


def test_fake_refuses_old_tensorrt(fake_trt, monkeypatch):
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "8.6.1")
    with pytest.raises(SgexError, match=r"TensorRT 8.6.1 is too old: sgex needs TensorRT >= 10.9"):
        tb.import_tensorrt()


# -- end to end with TensorRT (skips without it) --------------------------------------------------------
TRT_PSNR_DB = 35.0  # FP16 engine vs the same FP16 ONNX on ONNX Runtime, outputs clamped to [-1, 1] (peak-to-peak 2)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.clip(a, -1, 1).astype(np.float64), np.clip(b, -1, 1).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def _export_and_build(tmp_path, tiny_ckpt, task, flavor, res=256, max_batch=2):
    from export.engine import build_engines
    from export.onnx import export_task

    task_dir = export_task(task, res, ckpt=tiny_ckpt(task), out=tmp_path / "art", precision="fp16",
                           flavor=flavor, max_batch=max_batch, progress=False).parent
    cache_dir = tmp_path / "timing"
    cache_dir.mkdir()
    manifest = build_engines(task_dir, workspace_gb=2.0, timing_cache=str(cache_dir))
    return task_dir, manifest, cache_dir


@pytest.mark.trt
@pytest.mark.parametrize("task,flavor", [("superres", "portable"), ("superres", "plugin"),
                                         ("edit", "plugin"), ("mask2face", "portable")])
def test_trt_engine_matches_onnxruntime(tmp_path, tiny_ckpt, task, flavor):
    import tensorrt as trt

    from export.engine import timing_cache_key
    from runtime.engine import Engine

    task_dir, m, cache_dir = _export_and_build(tmp_path, tiny_ckpt, task, flavor)
    ident = tb.device_identity(0)
    assert set(m.engines) == set(m.graphs)
    for key, e in m.engines.items():
        assert (e["tensorrt"], e["gpu"], e["compute_capability"], e["precision"]) == (
            trt.__version__, ident.gpu, ident.compute_capability, "fp16")
        assert hashlib.sha256((task_dir / e["file"]).read_bytes()).hexdigest() == e["sha256"]
        has_plugin = flavor == "plugin" and key != "style"
        assert (e["plugin"] in ("aot", "jit")) if has_plugin else e["plugin"] is None
    assert (cache_dir / f"{timing_cache_key(trt.__version__, ident.gpu, ident.compute_capability)}.cache").is_file()

    rng = np.random.default_rng(0)
    with Engine(task_dir, backend="trt", device="cuda") as e_trt, Engine(task_dir, backend="ort", device="cpu") as e_ort:
        assert e_trt.backend.name == "trt"
        if task == "mask2face":
            x = rng.integers(0, 19, (2, 56, 40), dtype=np.uint8)
            y_trt, y_ort = e_trt.translate_float(x, seed=3), e_ort.translate_float(x, seed=3)
        else:
            x2 = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
            w_trt, w_ort = e_trt.compute_style(x2), e_ort.compute_style(x2)
            assert np.linalg.norm(w_trt - w_ort) <= 1e-2 * np.linalg.norm(w_ort)
            x1 = rng.integers(0, 256, (2, 56, 40, 3), dtype=np.uint8)  # multiples of 8: no padding
            y_trt, y_ort = e_trt.synthesize_float(x1, w_ort, seed=3), e_ort.synthesize_float(x1, w_ort, seed=3)
    assert y_trt.shape == y_ort.shape == (2, 3, 224, 160)
    assert _psnr(y_trt, y_ort) >= TRT_PSNR_DB


@pytest.mark.trt
def test_trt_cuda_graph_replay_equals_plain_run(tmp_path, tiny_ckpt):
    from runtime.engine import make_random_inputs

    task_dir, m, _ = _export_and_build(tmp_path, tiny_ckpt, "superres", "portable")
    rng = np.random.default_rng(1)
    feeds = [{"x1": rng.uniform(-1, 1, (1, 3, h, w)).astype(np.float32),
              "wplus": rng.standard_normal((1, 18, m.style_dim)).astype(np.float32),
              **make_random_inputs(s, 1, h, w, noise=True)} for s, (h, w) in enumerate([(64, 32), (32, 64), (64, 32)])]
    with tb.TrtBackend(task_dir, m, "cuda") as plain, tb.TrtBackend(task_dir, m, "cuda", cuda_graphs=True) as graphs:
        for f in feeds + feeds:  # the second pass replays the captured graphs
            np.testing.assert_array_equal(graphs.run("synth@256", f)["y"], plain.run("synth@256", f)["y"])


@pytest.mark.trt
def test_trt_refuses_engine_of_another_gpu(tmp_path, tiny_ckpt):
    from runtime.engine import Engine

    task_dir, m, _ = _export_and_build(tmp_path, tiny_ckpt, "inversion", "portable")
    m.engines["synth@256"]["gpu"] = "Some Other GPU"
    m.save(task_dir)
    with pytest.raises(SgexError, match="built for Some Other GPU .* sgex-export"):
        Engine(task_dir, backend="trt", device="cuda")

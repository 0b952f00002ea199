"""export/engine.py: profile shapes from the bucket table, timing-cache keys, engine entries, the
CLI helpers, and the behaviour without TensorRT (CPU, no TensorRT needed). The real build is
exercised end to end by tests/runtime/test_trt_backend.py under the `trt` marker."""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from export import engine as eng
from runtime.buckets import Bucket
from runtime.errors import MissingDependency, SgexError
from runtime.manifest import Manifest
from runtime.tasks import N_LATENT, N_NOISE, TASKS, noise_shapes

D = 128  # style dim of the tiny model (512 // 4)


# -- manifest graph entries exactly as export.onnx writes them (graph_io is its manifest source) ----
def graph_entries(task_name: str, sides=(128,), max_batch=2) -> dict:
    from export.onnx import graph_file, graph_io

    task = TASKS[task_name]
    graphs = {}
    if "style" in task.graphs:
        ins, outs = graph_io(task_name, "style", D)
        graphs["style"] = {"file": graph_file("style", None), "sha256": "0" * 64, "graph": "style",
                           "bucket": None, "inputs": ins, "outputs": outs}
    g = task.graphs[-1]
    for side in sides:
        ins, outs = graph_io(task_name, g, D)
        graphs[f"{g}@{side}"] = {"file": graph_file(g, side), "sha256": f"{side:064d}", "graph": g,
                                 "bucket": {"side": side, "max_batch": max_batch}, "inputs": ins, "outputs": outs}
    return graphs


def make_manifest(task_name: str, sides=(128,), max_batch=2, flavor="portable") -> Manifest:
    task = TASKS[task_name]
    m = Manifest.new(task=task_name, variant=task.default_variant.name, precision="fp16", flavor=flavor,
                     noise="explicit" if task.noise == "random" else "zero", style_dim=D, n_latent=N_LATENT,
                     inputs={}, checkpoint={"file": None, "sha256": None, "random": True, "seed": 0},
                     versions={"sgex": "0.1.0"})
    m.graphs.update(graph_entries(task_name, sides, max_batch))
    m.validate()
    return m


# -- profile shapes --------------------------------------------------------------------------------
@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_profile_shapes_every_task_graph(task_name):
    task = TASKS[task_name]
    m = make_manifest(task_name, sides=(64, 128), max_batch=2)
    for key, graph in m.graphs.items():
        bucket = eng.graph_bucket(m, key)
        shapes = eng.profile_shapes(graph, bucket, opt_batch=1)
        assert list(shapes) == [i["name"] for i in graph["inputs"]]
        if key == "style":
            assert bucket.max_batch == 2
            assert shapes["x2"] == {"min": (1, 3, 256, 256), "opt": (1, 3, 256, 256), "max": (2, 3, 256, 256)}
            continue
        side = graph["bucket"]["side"] // 4  # bucket = output side; x1 up to a quarter of it
        img = "x1" if task.graphs[-1] == "synth" else "x"
        c = 3 if img == "x1" else task.in_channels
        assert shapes[img] == {"min": (1, c, 8, 8), "opt": (1, c, side, side), "max": (2, c, side, side)}
        for name in ("wplus", "editing_w"):
            if name in shapes:
                assert shapes[name] == {"min": (1, N_LATENT, D), "opt": (1, N_LATENT, D), "max": (2, N_LATENT, D)}
        if "z" in shapes:
            assert shapes["z"] == {"min": (1, D), "opt": (1, D), "max": (2, D)}
        for inp in graph["inputs"]:  # the exporter's symbolic dims, evaluated, agree with the profile
            for lvl in ("min", "max"):
                b, _, h, w = shapes[img][lvl]
                env = {"batch": b, "height": h, "width": w}
                want = tuple(d if isinstance(d, int) else eval(d, {}, env) for d in inp["shape"])
                assert shapes[inp["name"]][lvl] == want, (inp["name"], lvl)
        noises = [n for n in shapes if n.startswith("noise_")]
        assert len(noises) == (N_NOISE if task.noise == "random" else 0)
        for j, name in enumerate(noises):
            assert shapes[name]["min"] == (1, 1, *noise_shapes(8, 8)[j])
            assert shapes[name]["max"] == (2, 1, *noise_shapes(side, side)[j])


def test_profile_noise_ends_at_output_size():
    """Recorded facts: bucket 512 (x1 up to 128): the first noise map is F=16 and the last one is
    the output, 512; at the profile minimum (x1 8x8) they are 1 and 32."""
    shapes = eng.profile_shapes(make_manifest("superres", sides=(512,)).graphs["synth@512"], Bucket(512, 2))
    assert shapes["x1"]["max"] == (2, 3, 128, 128)
    assert shapes["noise_0"]["max"] == (2, 1, 16, 16)
    assert shapes["noise_16"]["max"] == (2, 1, 512, 512)
    assert shapes["noise_0"]["min"] == (1, 1, 1, 1)
    assert shapes["noise_16"]["min"] == (1, 1, 32, 32)


def test_profile_opt_batch_is_clamped_to_bucket():
    shapes = eng.profile_shapes(make_manifest("toonify").graphs["synth@128"], Bucket(128, 2), opt_batch=8)
    assert shapes["x1"]["opt"] == (2, 3, 32, 32)


def test_style_graph_takes_largest_max_batch():
    m = make_manifest("inversion", sides=(64,), max_batch=2)
    m.graphs.update({k.replace("64", "256"): {**g, "bucket": {"side": 256, "max_batch": 5},
                                              "file": "256/synth.onnx"}
                     for k, g in graph_entries("inversion", (64,)).items() if k != "style"})
    assert eng.graph_bucket(m, "style").max_batch == 5
    assert eng.graph_bucket(m, "synth@64") == Bucket(64, 2)


def test_profile_rejects_manifest_that_contradicts_buckets():
    g = make_manifest("superres").graphs
    bad_fixed = {**g["style"], "inputs": [{"name": "x2", "dtype": "float32", "shape": ["batch", 3, 512, 512]}]}
    with pytest.raises(SgexError, match="x2 dim 2 is fixed to 512"):
        eng.profile_shapes(bad_fixed, Bucket(128, 2))
    bad_sym = {**g["synth@128"], "inputs": [{"name": "wplus", "dtype": "float32", "shape": ["batch", "rows", D]}]}
    with pytest.raises(SgexError, match="wplus dim 1 is symbolic"):
        eng.profile_shapes(bad_sym, Bucket(128, 2))
    bad_rank = {**g["synth@128"], "inputs": [{"name": "x1", "dtype": "float32", "shape": ["batch", 3, "height"]}]}
    with pytest.raises(SgexError, match="x1 has 3 dims"):
        eng.profile_shapes(bad_rank, Bucket(128, 2))


def test_select_graphs():
    m = make_manifest("edit", sides=(64, 128))
    assert eng.select_graphs(m) == ["style", "synth@64", "synth@128"]
    assert eng.select_graphs(m, ["synth"]) == ["synth@64", "synth@128"]
    assert eng.select_graphs(m, ["synth@128", "style"]) == ["synth@128", "style"]
    with pytest.raises(SgexError, match="no exported graph 'translate'"):
        eng.select_graphs(m, ["translate"])


# -- timing cache --------------------------------------------------------------------------------
def test_timing_cache_key():
    k = eng.timing_cache_key("10.9.0.34", "NVIDIA H100 80GB HBM3", "9.0")
    assert k == "trt-10.9.0.34_nvidia-h100-80gb-hbm3_sm90"
    assert eng.timing_cache_key("10.9.0.34", "NVIDIA H100 80GB HBM3", "9.0") == k
    others = {eng.timing_cache_key("11.0.0.1", "NVIDIA H100 80GB HBM3", "9.0"),
              eng.timing_cache_key("10.9.0.34", "NVIDIA H200", "9.0"),
              eng.timing_cache_key("10.9.0.34", "NVIDIA H100 80GB HBM3", "8.9")}
    assert k not in others and len(others) == 3
    weird = eng.timing_cache_key("10.9", "GeForce RTX 4090 / (laptop)", "8.9")
    assert "/" not in weird and " " not in weird and "(" not in weird


def test_timing_cache_path(tmp_path):
    key = "trt-10.9_x_sm90"
    assert eng.timing_cache_path(tmp_path, "auto", key) == tmp_path / "trt-timing-cache" / f"{key}.cache"
    assert eng.timing_cache_path(tmp_path, None, key) == tmp_path / "trt-timing-cache" / f"{key}.cache"
    assert eng.timing_cache_path(tmp_path, "none", key) is None
    shared = tmp_path / "shared"
    shared.mkdir()
    assert eng.timing_cache_path(tmp_path, str(shared), key) == shared / f"{key}.cache"
    assert eng.timing_cache_path(tmp_path, str(tmp_path / "my.cache"), key) == tmp_path / "my.cache"


# -- engine entry ----------------------------------------------------------------------------------
def test_engine_entry_fields():
    m = make_manifest("superres")
    graph = m.graphs["synth@128"]
    shapes = eng.profile_shapes(graph, Bucket(128, 2))
    e = eng.engine_entry(graph=graph, data=b"plan", tensorrt="10.9.0.34", gpu="NVIDIA H100", compute_capability="9.0",
                         profile=shapes, precision="fp16", plugin="aot", workspace_gb=4.0)
    assert e["file"] == "128/synth.engine"
    assert e["sha256"] == hashlib.sha256(b"plan").hexdigest()
    assert e["onnx_sha256"] == graph["sha256"]
    assert e["profile"]["x1"] == {"min": [1, 3, 8, 8], "opt": [1, 3, 32, 32], "max": [2, 3, 32, 32]}
    assert (e["tensorrt"], e["gpu"], e["compute_capability"], e["precision"], e["plugin"]) == (
        "10.9.0.34", "NVIDIA H100", "9.0", "fp16", "aot")
    m.engines["synth@128"] = e
    m.validate()  # the runtime manifest accepts the entry
    with pytest.raises(ValueError):
        eng.engine_entry(graph=graph, data=b"", tensorrt="10.9", gpu="g", compute_capability="9.0",
                         profile=shapes, precision="fp16", plugin="cuda", workspace_gb=None)


# -- without TensorRT ------------------------------------------------------------------------------
def test_build_without_tensorrt_names_the_extra(no_tensorrt, tmp_path):
    with pytest.raises(MissingDependency) as e:
        eng.build_engines(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "TensorRT is not installed" in msg and "pip install" in msg and "'sgex[trt]'" in msg


def _parser():
    p = argparse.ArgumentParser(prog="sgex-export")
    eng.add_engine_args(p)
    return p


def test_engine_flag_without_tensorrt_is_one_line(no_tensorrt, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--engine"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sgex-export: error: --engine: TensorRT is not installed")
    assert "pip install -c constraints.txt 'sgex[trt]'" in err


def test_maybe_build_is_a_no_op_without_flag(no_tensorrt, tmp_path):
    args = _parser().parse_args([])
    assert (args.engine, args.workspace_gb, args.timing_cache, args.opt_batch, args.rebuild_engines) == (
        False, None, "auto", 1, False)
    assert eng.maybe_build(args, tmp_path) is None


def test_maybe_build_without_tensorrt(no_tensorrt, tmp_path):
    args = argparse.Namespace(engine=True, workspace_gb=2.0, timing_cache="auto", opt_batch=1, rebuild_engines=False)
    with pytest.raises(MissingDependency, match=r"sgex\[trt\]"):
        eng.maybe_build(args, tmp_path)


def test_module_imports_no_tensorrt():
    code = ("import sys, export.engine, runtime.backends.trt; "
            "bad = [m for m in ('tensorrt', 'polygraphy', 'torch', 'onnx') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parents[2]))


# -- plugin kind -------------------------------------------------------------------------------------
def _plugin_graph(path, aots):
    import onnx
    from onnx import TensorProto, helper

    from kernels.onnx_op import DOMAIN, OP_TYPE

    nodes = [helper.make_node(OP_TYPE, ["x", "w", "s", "n", "ns", "b"], [f"y{i}"], domain=DOMAIN, dilation=1,
                              padding=1, demodulate=1, activate=1, has_noise=0, has_bias=0,
                              plugin_namespace="sgex", **({} if a is None else {"aot": a}))
             for i, a in enumerate(aots)]
    nodes.append(helper.make_node("Relu", ["x"], ["r"]))
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "w", "s", "n", "ns", "b")]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in [f"y{i}" for i in range(len(aots))] + ["r"]]
    model = helper.make_model(helper.make_graph(nodes, "g", ins, outs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    onnx.save(model, str(path))
    return path


def test_plugin_kind_from_onnx_nodes(tmp_path):
    assert eng.plugin_mode([]) is None
    assert eng.plugin_mode([1, 1]) == "aot"
    assert eng.plugin_mode([1, 0]) == "jit"
    assert eng._onnx_aot_values(_plugin_graph(tmp_path / "a.onnx", [1, 1, 1])) == [1, 1, 1]
    assert eng._onnx_aot_values(_plugin_graph(tmp_path / "b.onnx", [1, None])) == [1, 0]
    assert eng._onnx_aot_values(_plugin_graph(tmp_path / "c.onnx", [])) == []


# -- build_engines' bookkeeping against a fake tensorrt / polygraphy / cuda-python ---------------------
# The fake records what build_engines hands to Polygraphy (profiles, strong typing, workspace, timing
# cache) and returns placeholder plan bytes; it checks sgex's orchestration, not TensorRT.
FAKE_TRT, FAKE_GPU = "10.9.0.34", "NVIDIA Fake GPU"


@pytest.fixture
def fake_build(monkeypatch, tmp_path):
    import json
    import types

    calls = types.SimpleNamespace(profiles=[], networks=[], configs=[], builds=[])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = FAKE_TRT
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.LayerType = types.SimpleNamespace(PLUGIN_V3="plugin_v3", CONVOLUTION="conv")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")

    class Profile(dict):
        def add(self, name, min, opt, max):
            self[name] = {"min": tuple(min), "opt": tuple(opt), "max": tuple(max)}
            return self

    class Network:
        def __init__(self, kinds):
            self.kinds = kinds
            self.num_layers = len(kinds)

        def get_layer(self, i):
            return types.SimpleNamespace(type=self.kinds[i])

    def network_from_onnx_path(path, strongly_typed=None):
        calls.networks.append((path, strongly_typed))
        return "builder", Network(json.loads(Path(path).read_text())["layers"]), "parser"

    def CreateConfig(**kw):
        calls.configs.append(kw)
        calls.profiles.append(kw["profiles"][0])
        return ("config", len(calls.configs))

    def engine_bytes_from_network(network, config=None, save_timing_cache=None):
        calls.builds.append(save_timing_cache)
        if save_timing_cache:
            Path(save_timing_cache).write_bytes(b"timings")
        return f"plan {config[1]}".encode()

    poly = types.ModuleType("polygraphy.backend.trt")
    poly.Profile, poly.CreateConfig = Profile, CreateConfig
    poly.network_from_onnx_path, poly.engine_bytes_from_network = network_from_onnx_path, engine_bytes_from_network

    cudart = types.ModuleType("cuda.bindings.runtime")
    cudart.cudaGetDeviceProperties = lambda i: (0, types.SimpleNamespace(name=FAKE_GPU.encode() + b"\0", major=9, minor=0))
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, cudart
    for name, mod in (("tensorrt", trt), ("polygraphy.backend.trt", poly), ("cuda", cuda),
                      ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, mod)

    m = make_manifest("superres", sides=(64,), max_batch=2)
    task_dir = tmp_path / "superres"
    for key, g in m.graphs.items():  # stand-in graph files: the fake parser reads its layer kinds
        p = task_dir / g["file"]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"layers": ["conv", "conv"]}))
        g["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    m.save(task_dir)
    return types.SimpleNamespace(calls=calls, dir=task_dir, manifest=m, trt=trt)


def test_fake_build_records_engines(fake_build):
    from runtime.backends.trt import DeviceIdentity, check_engine_entry

    calls, task_dir = fake_build.calls, fake_build.dir
    m = eng.build_engines(task_dir, workspace_gb=2.0)
    assert list(m.engines) == ["style", "synth@64"]
    assert [st for _, st in calls.networks] == [True, True]
    assert all(c["memory_pool_limits"] == {"workspace": 2 << 30} for c in calls.configs)
    assert all(c["tf32"] is False for c in calls.configs)  # FP32 layers stay FP32
    key = eng.timing_cache_key(FAKE_TRT, FAKE_GPU, "9.0")
    cache = task_dir / "trt-timing-cache" / f"{key}.cache"
    assert calls.builds == [str(cache), str(cache)] and cache.read_bytes() == b"timings"
    assert calls.configs[0]["load_timing_cache"] is None and calls.configs[1]["load_timing_cache"] == str(cache)
    for key, profile in zip(m.engines, calls.profiles):
        assert dict(profile) == eng.profile_shapes(m.graphs[key], eng.graph_bucket(m, key))

    saved = Manifest.load(task_dir)
    saved.verify(task_dir)  # engine files and hashes as the runtime checks them
    for key, e in saved.engines.items():
        assert (task_dir / e["file"]).parent == (task_dir / saved.graphs[key]["file"]).parent
        check_engine_entry(key, e, saved.graphs[key], tensorrt=FAKE_TRT, device=DeviceIdentity(FAKE_GPU, "9.0"))
        assert saved.read_verified(task_dir, key, kind="engine") == (task_dir / e["file"]).read_bytes()
        assert (e["precision"], e["plugin"], e["workspace_gb"]) == ("fp16", None, 2.0)
    assert not list(task_dir.rglob("*.tmp"))

    n = len(calls.builds)
    eng.build_engines(task_dir, workspace_gb=2.0)  # both current: nothing rebuilt
    assert len(calls.builds) == n
    eng.build_engines(task_dir, opt_batch=2)  # another profile: both rebuilt
    assert len(calls.builds) == n + 2
    (task_dir / saved.engines["style"]["file"]).write_bytes(b"damaged")
    eng.build_engines(task_dir, opt_batch=2)  # only the damaged engine
    assert len(calls.builds) == n + 3
    eng.build_engines(task_dir, timing_cache="none", graphs=["synth"], opt_batch=2, force=True)
    assert len(calls.builds) == n + 4
    assert calls.builds[-1] is None and calls.configs[-1]["memory_pool_limits"] is None
    Manifest.load(task_dir).verify(task_dir)


def test_fake_build_refuses_bad_inputs(fake_build):
    task_dir, m = fake_build.dir, fake_build.manifest
    with pytest.raises(SgexError, match="workspace-gb must be positive"):
        eng.build_engines(task_dir, workspace_gb=0)
    (task_dir / m.graphs["synth@64"]["file"]).write_text('{"layers": ["plugin_v3"]}')
    with pytest.raises(SgexError, match="not the graph the manifest names"):
        eng.build_engines(task_dir, graphs=["synth"])
    m.graphs["synth@64"]["sha256"] = hashlib.sha256((task_dir / m.graphs["synth@64"]["file"]).read_bytes()).hexdigest()
    m.save(task_dir)
    with pytest.raises(SgexError, match="TensorRT parsed 1 plugin layers, the manifest \\(flavor 'portable'\\) implies none"):
        eng.build_engines(task_dir, graphs=["synth"])
    assert not Manifest.load(task_dir).engines


def test_fake_build_plugin_flavor(fake_build, monkeypatch):
    import json

    from kernels import trt_plugin

    task_dir, m = fake_build.dir, fake_build.manifest
    m.data["flavor"] = "plugin"
    synth = task_dir / m.graphs["synth@64"]["file"]
    synth.write_text(json.dumps({"layers": ["conv", "plugin_v3", "plugin_v3"]}))
    m.graphs["synth@64"]["sha256"] = hashlib.sha256(synth.read_bytes()).hexdigest()
    m.save(task_dir)
    registered = []
    monkeypatch.setattr(trt_plugin, "register", lambda: registered.append(True))
    monkeypatch.setattr(eng, "_onnx_aot_values", lambda p: [1, 1] if p == synth else [])
    out = eng.build_engines(task_dir)
    assert registered == [True]
    assert (out.engines["style"]["plugin"], out.engines["synth@64"]["plugin"]) == (None, "aot")
    monkeypatch.setattr(eng, "_onnx_aot_values", lambda p: [1, 0] if p == synth else [])
    monkeypatch.setattr(trt_plugin, "require_jit_runtime", lambda: registered.append("jit deps"))
    assert eng.build_engines(task_dir, graphs=["synth"], force=True).engines["synth@64"]["plugin"] == "jit"
    assert registered == [True, True, "jit deps"]  # register per build, then the JIT check

    def no_cuda_torch():
        raise trt_plugin.PluginDepsMissing("the JIT plugin (aot=0) needs a CUDA build of torch")

    monkeypatch.setattr(trt_plugin, "require_jit_runtime", no_cuda_torch)
    with pytest.raises(SgexError, match="needs a CUDA build of torch"):
        eng.build_engines(task_dir, graphs=["synth"], force=True)


def test_fake_cli_helpers_build(fake_build):
    args = _parser().parse_args(["--engine", "--workspace-gb", "1.5", "--opt-batch", "2", "--timing-cache", "none"])
    m = eng.maybe_build(args, fake_build.dir)
    assert sorted(m.engines) == ["style", "synth@64"]
    assert m.engines["synth@64"]["profile"]["x1"]["opt"] == [2, 3, 16, 16]  # bucket 64: x1 up to 16
    assert fake_build.calls.configs[0]["memory_pool_limits"] == {"workspace": int(1.5 * (1 << 30))}
    assert not (fake_build.dir / "trt-timing-cache").exists()

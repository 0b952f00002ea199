"""sgex-triton: the Triton model repository of the tiny superres export, checked against Triton's
own config schema (tritonclient's model_config_pb2) and against the ONNX graphs themselves.
Triton's server cannot run here; these are the checks that do not need it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
onnx = pytest.importorskip("onnx")
from google.protobuf import text_format  # noqa: E402  (after the skip: protobuf comes with tritonclient)

ROOT = Path(__file__).resolve().parents[2]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _configs(repo: Path) -> dict:
    """name -> ModelConfig, parsed with Triton's schema (unknown fields raise)."""
    out = {}
    for d in sorted(p for p in repo.iterdir() if p.is_dir()):
        cfg = text_format.Parse((d / "config.pbtxt").read_text(), pb.ModelConfig())
        assert cfg.name == d.name
        assert (d / "1").is_dir(), f"{d.name}: no version folder"
        out[cfg.name] = cfg
    return out


def _onnx_io(path: Path):
    """(inputs, outputs) of an ONNX graph: [(name, Triton dtype, dims without batch)], the batch
    dimension checked to be dynamic; -1 for every dynamic dimension."""
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)

    def conv(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            assert dims[0] == -1, f"{v.name}: the batch dimension is not dynamic"
            np_dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
            triton = {"float32": pb.TYPE_FP32, "float16": pb.TYPE_FP16, "int64": pb.TYPE_INT64}[str(np_dtype)]
            out.append((v.name, triton, dims[1:]))
        return out

    init = {i.name for i in model.graph.initializer}
    return conv([i for i in model.graph.input if i.name not in init]), conv(model.graph.output)


def _cfg_io(tensors):
    return [(t.name, t.data_type, list(t.dims)) for t in tensors]


@pytest.fixture(scope="module")
def repo(tiny_superres_export, tmp_path_factory):
    from export.triton import write_repository

    out = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(tiny_superres_export, out)
    return out


def test_every_model_matches_its_onnx_graph(repo, tiny_superres_export):
    from runtime.manifest import Manifest

    manifest = Manifest.load(tiny_superres_export)
    configs = _configs(repo)
    singles = {n: c for n, c in configs.items() if c.platform != "ensemble"}
    assert len(singles) == len(manifest.graphs)
    by_file = {g["sha256"]: (k, g) for k, g in manifest.graphs.items()}
    for name, cfg in singles.items():
        assert cfg.platform == "onnxruntime_onnx" and cfg.default_model_filename == "model.onnx"
        path = repo / name / "1" / "model.onnx"
        key, entry = by_file[_sha(path)]  # the very graph the manifest hashed
        ins, outs = _onnx_io(path)
        assert _cfg_io(cfg.input) == ins, name
        assert _cfg_io(cfg.output) == outs, name
        want_batch = entry["bucket"]["max_batch"] if entry.get("bucket") else entry["dims"]["batch"]["max"]
        assert cfg.max_batch_size == want_batch
        assert cfg.HasField("dynamic_batching")
        if entry.get("bucket"):
            x = dict((n, d) for n, _, d in ins)["x1"]
            assert x[1:] == [-1, -1], "height and width must be dynamic"
            assert name.endswith(f"_{entry['bucket']['side']}")


def test_ensemble_connects_style_to_synth_by_name(repo):
    configs = _configs(repo)
    ensembles = [c for c in configs.values() if c.platform == "ensemble"]
    assert ensembles, "no ensemble for the RGB task"
    for ens in ensembles:
        available = {t.name for t in ens.input}
        produced = set()
        steps = list(ens.ensemble_scheduling.step)
        assert [configs[s.model_name].platform != "ensemble" for s in steps] == [True, True]
        assert steps[0].model_name.endswith("_style")
        for step in steps:
            model = configs[step.model_name]
            assert set(step.input_map) == {t.name for t in model.input}, "every model input is fed"
            assert set(step.input_map.values()) <= available, "a step reads a tensor nothing provides"
            assert set(step.output_map) <= {t.name for t in model.output}
            available |= set(step.output_map.values())
            produced |= set(step.output_map.values())
            assert ens.max_batch_size <= model.max_batch_size
        style, synth = steps
        assert set(style.output_map.values()) & set(synth.input_map.values()) == {"wplus"}
        assert {t.name for t in ens.output} <= produced
        consumed = set().union(*(s.input_map.values() for s in steps))
        assert {t.name for t in ens.input} <= consumed, "an ensemble input is never used"
        # the ensemble's own tensors carry the step models' dtypes and dims
        sig = {t.name: (t.data_type, list(t.dims)) for s in steps for t in configs[s.model_name].input}
        assert all(sig[t.name] == (t.data_type, list(t.dims)) for t in ens.input)


def test_engines_become_tensorrt_plan_models_named_by_compute_capability(tiny_superres_export, tmp_path):
    """An export with a TensorRT engine for synth@<side>: that model is tensorrt_plan, its file is
    1/model_<cc>.plan and cc_model_filenames maps the engine's compute capability to it. (The
    engine here is stand-in bytes: Triton's config does not read it, and no TensorRT runs here.)"""
    from export.triton import write_repository
    from runtime.manifest import Manifest, sha256_file

    art = tmp_path / "art"
    shutil.copytree(tiny_superres_export, art, copy_function=os.link)
    m = Manifest.load(art)
    key = next(k for k in m.graphs if "@" in k)
    eng = art / m.graphs[key]["file"].replace(".onnx", ".engine")
    eng.write_bytes(b"stand-in engine bytes")
    m.engines[key] = {"file": str(eng.relative_to(art)), "sha256": sha256_file(eng),
                      "onnx_sha256": m.graphs[key]["sha256"], "compute_capability": "9.0",
                      "gpu": "NVIDIA H100 80GB HBM3", "tensorrt": "10.9.0.34", "precision": "fp32"}
    m.save(art)
    out = tmp_path / "repo"
    write_repository(art, out)
    configs = _configs(out)
    plans = [c for c in configs.values() if c.platform == "tensorrt_plan"]
    assert len(plans) == 1
    (plan,) = plans
    assert dict(plan.cc_model_filenames) == {"9.0": "model_9.0.plan"}
    assert (out / plan.name / "1" / "model_9.0.plan").read_bytes() == b"stand-in engine bytes"
    assert all(c.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU for c in plans)
    onnx_twin = _onnx_io(art / m.graphs[key]["file"])
    assert (_cfg_io(plan.input), _cfg_io(plan.output)) == onnx_twin


def test_refusals(tiny_superres_export, tmp_path):
    from export.triton import plan_models
    from runtime.errors import SgexError
    from runtime.manifest import Manifest

    m = Manifest.load(tiny_superres_export)
    plugin = Manifest.from_dict({**m.data, "flavor": "plugin"})
    with pytest.raises(SgexError, match="plugin flavor"):
        plan_models(plugin)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args, text in ((["--artifacts", str(tiny_superres_export), "--out", str(busy)], "not an empty folder"),
                       (["--artifacts", str(tmp_path / "none"), "--out", str(tmp_path / "r")], "does not exist")):
        r = subprocess.run([sys.executable, "-m", "export.triton", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sgex-triton: error:") and text in lines[0], r.stderr
    assert (busy / "x").read_text() == "keep me" and sorted(p.name for p in busy.iterdir()) == ["x"]
    assert not (tmp_path / "r").exists()


def test_a_failed_write_leaves_nothing(tiny_superres_export, tmp_path):
    """A tampered export is refused before the repository exists (no partial repository)."""
    from export.triton import write_repository
    from runtime.errors import SgexError
    from runtime.manifest import Manifest

    art = tmp_path / "art"
    shutil.copytree(tiny_superres_export, art, copy_function=os.link)
    style = art / Manifest.load(art).graphs["style"]["file"]
    style.unlink()  # a new file, not a write through the link into the shared fixture
    style.write_bytes(b"tampered")
    with pytest.raises(SgexError, match="sha256"):
        write_repository(art, tmp_path / "repo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_translate_tasks_have_no_ensemble(tiny_superres_export):
    """sketch2face/mask2face have one per-bucket translate graph and no style graph: one model per
    bucket, no ensemble (planned from a manifest; no translate export is made here)."""
    from export.triton import config_text, plan_models
    from runtime.manifest import Manifest

    base = Manifest.load(tiny_superres_export).data
    key = next(k for k in base["graphs"] if "@" in k)
    side = base["graphs"][key]["bucket"]["side"]
    entry = {**base["graphs"][key], "graph": "translate", "file": f"{side}/translate.onnx",
             "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 1, "height", "width"]},
                        {"name": "z", "dtype": "float32", "shape": ["batch", base["style_dim"]]}]
             + [i for i in base["graphs"][key]["inputs"] if i["name"].startswith("noise_")]}
    m = Manifest.from_dict({**base, "task": "sketch2face", "variant": "sketch2face",
                            "graphs": {f"translate@{side}": entry}})
    (model,) = plan_models(m)
    cfg = text_format.Parse(config_text(model), pb.ModelConfig())
    assert cfg.name == f"sgex_sketch2face_translate_{side}" and cfg.platform == "onnxruntime_onnx"
    assert [(t.name, list(t.dims)) for t in cfg.input][:2] == [("x", [1, -1, -1]), ("z", [base["style_dim"]])]
    assert [t.name for t in cfg.input][2:] == [f"noise_{j}" for j in range(17)]

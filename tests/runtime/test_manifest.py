"""runtime.manifest: loading, validation, hash verification, merging (no torch needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runtime.buckets import Bucket
from runtime.errors import SgexError
from runtime.manifest import MANIFEST_NAME, Manifest, graph_io, graph_key, parse_graph_key, sha256_file
from runtime.tasks import TASKS


def _new(task="superres", precision="fp32", flavor="portable", sha="c" * 64, variant="sr"):
    return Manifest.new(
        task=task, variant=variant, precision=precision, flavor=flavor,
        noise="explicit" if TASKS[task].noise == "random" else "zero",
        style_dim=128, n_latent=18, inputs={"x1": {"kind": "rgb"}},
        checkpoint={"file": "x.pt", "sha256": sha, "random": False, "seed": None},
        versions={"sgex": "0.1.0"},
    )


def _add(m, d, key, rel, payload: bytes, side=None):
    p = d / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(payload)
    ins, outs = graph_io(TASKS[m.task], key.split("@")[0], m.style_dim)
    m.graphs[key] = {"file": rel, "sha256": sha256_file(p), "graph": key.split("@")[0],
                     "bucket": None if side is None else {"side": side, "max_batch": 4},
                     "inputs": [{"name": n, "shape": sh} for n, sh in ins.items()],
                     "outputs": [{"name": n, "shape": sh} for n, sh in outs.items()]}


@pytest.fixture
def task_dir(tmp_path):
    d = tmp_path / "superres"
    m = _new()
    _add(m, d, "style", "style/style.onnx", b"style-bytes")
    _add(m, d, "synth@128", "128/synth.onnx", b"synth-bytes" * 100, side=128)
    m.save(d)
    return d


def test_roundtrip_buckets_and_verify(task_dir):
    m = Manifest.load(task_dir, task="superres")
    assert m.task == "superres" and m.precision == "fp32"
    assert m.buckets() == [Bucket(128, 4)]
    assert m.bucket_graph_name() == "synth"
    assert m.path(task_dir, "synth@128") == task_dir / "128" / "synth.onnx"
    m.verify(task_dir)
    m.verify(task_dir, keys=["synth@128"])
    assert not list(task_dir.glob("*.tmp"))


def test_graph_keys():
    assert graph_key("synth", 128) == "synth@128" and graph_key("style", None) == "style"
    assert parse_graph_key("translate@512") == ("translate", 512)
    assert parse_graph_key("style") == ("style", None)


def test_tampered_file_refused(task_dir):
    p = task_dir / "128" / "synth.onnx"
    b = bytearray(p.read_bytes())
    b[17] ^= 0x01  # one byte changed
    p.write_bytes(bytes(b))
    m = Manifest.load(task_dir)
    with pytest.raises(SgexError, match=r"synth\.onnx: sha256 does not match") as e:
        m.verify(task_dir)
    assert "\n" not in str(e.value)
    m.verify(task_dir, keys=["style"])  # the untouched graph alone still verifies


def test_missing_file_refused(task_dir):
    (task_dir / "style" / "style.onnx").unlink()
    with pytest.raises(SgexError, match="style.onnx: missing"):
        Manifest.load(task_dir).verify(task_dir)


def test_missing_manifest_refused(tmp_path):
    with pytest.raises(SgexError, match="no manifest.json"):
        Manifest.load(tmp_path)


def test_wrong_task_refused(task_dir):
    with pytest.raises(SgexError, match="manifest of task 'superres', not 'toonify'"):
        Manifest.load(task_dir, task="toonify")


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(format="something-else"), "not an sgex manifest"),
    (lambda d: d.update(version=3), "version 3 is not supported"),
    (lambda d: d.update(version=1), r"old layout \(manifest version 1, buckets named by the input side\); re-export"),
    (lambda d: d.pop("graphs"), "lacks graphs"),
    (lambda d: d.update(task="colorize"), "unknown task"),
    (lambda d: d["graphs"]["style"].update(file="../../etc/passwd"), "unsafe file path"),
    (lambda d: d["graphs"].update({"synth@big": d["graphs"]["style"]}), "bad graph key"),
])
def test_foreign_or_invalid_manifest_refused(task_dir, edit, match):
    p = task_dir / MANIFEST_NAME
    d = json.loads(p.read_text())
    edit(d)
    p.write_text(json.dumps(d))
    with pytest.raises(SgexError, match=match) as e:
        Manifest.load(task_dir)
    assert "\n" not in str(e.value)


def test_not_json_refused(task_dir):
    (task_dir / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(SgexError, match="not a valid JSON manifest"):
        Manifest.load(task_dir)


def test_unknown_graph_key(task_dir):
    m = Manifest.load(task_dir)
    with pytest.raises(SgexError, match=r"no exported graph 'synth@512' \(exported: style, synth@128\)"):
        m.graph("synth@512")
    with pytest.raises(SgexError, match="synth@512"):
        m.verify(task_dir, keys=["synth@512"])


def test_merge_adds_bucket_and_drops_stale_engine(task_dir, tmp_path):
    old = Manifest.load(task_dir)
    old.engines["synth@128"] = {"file": "128/synth.engine", "sha256": "0" * 64}
    new = _new()
    _add(new, task_dir, "synth@256", "256/synth.onnx", b"bigger", side=256)
    merged = old.merge(new)
    assert [b.side for b in merged.buckets()] == [128, 256]
    assert "synth@128" in merged.engines  # untouched graph keeps its engine
    new2 = _new()
    _add(new2, task_dir, "synth@128", "128/synth.onnx", b"re-exported", side=128)
    merged2 = merged.merge(new2)
    assert "synth@128" not in merged2.engines  # engine of a replaced graph is stale


@pytest.mark.parametrize("kw, match", [
    (dict(precision="fp16"), "precision differs"),
    (dict(flavor="plugin"), "flavor differs"),
    (dict(sha="d" * 64), "checkpoint differs"),
    (dict(task="toonify", variant="cartoon"), "task differs"),
])
def test_merge_refuses_incompatible(task_dir, kw, match):
    with pytest.raises(SgexError, match=match):
        Manifest.load(task_dir).merge(_new(**kw))


def test_imports_without_torch():
    code = ("import sys, runtime.manifest; "
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)

"""export.onnx: ONNX Runtime vs the PyTorch reference for every task, dynamic axes, manifests,
the plugin flavor and FP16 artifacts.

Exports dominate the cost (~25 s each on an idle 2-core machine, minutes under load), so each
artifact is exported once per session (width_div=4 checkpoints, bucket 384: outputs up to 384, x1
up to 96) and shared by every test that reads it (8 exports by default):
  edit         export_task fp32 (style + synth@384 + editing_w.npy)
  superres, toonify, inversion   export_graph fp32 of the per-bucket graph
  sketch2face  export_task fp32 (translate@384) and export_task --flavor plugin
  mask2face    sgex-export fp32 through export.cli.main (test_cli_export_success checks the CLI side)
The style graph has the same code path for the four RGB tasks (only weights differ), so it is
exported once (edit). FP16 is checked by converting these FP32 exports with the default plan
(what export_task does after the export); the end-to-end fp16 export_task is marked slow.
Tolerance (`_tol`): max |diff| <= 1e-4 for outputs of unit scale, as the issue asks, scaled by the
output magnitude when that exceeds 1: random width_div=4 checkpoints give unclamped outputs up to
~40 (std ~12), where float32 rounding alone (different conv algorithms in ORT and PyTorch) is
~3e-6 relative, i.e. ~1e-4 absolute. Real images are in [-1, 1], where the bound is plain 1e-4.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from export.onnx import export_graph, export_task, graph_io, ort_session  # noqa: E402
from runtime.errors import SgexError  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.tasks import TASKS, get_task, noise_shapes  # noqa: E402

SIDE = 384  # bucket = output side; x1 up to 96
ATOL = 1e-4
# (batch, height, width) of x1 inside bucket 384: official crop sizes (multiples of 8, not of 16 or
# 32) and a multiple of 32, all run by the one exported graph
SHAPES = [(2, 72, 88), (1, 40, 56), (2, 40, 56), (1, 64, 96)]
PSNR_MIN = 35.0


def _model(path, task):
    from export.checkpoint import build_model, load_checkpoint

    return build_model(load_checkpoint(path), task)


@pytest.fixture(scope="session")
def art(tiny_ckpt, tmp_path_factory):
    """art(name) -> dict(kind, task, model, dir/path); each artifact exported once per session."""
    cache = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(name: str) -> dict:
        if name in cache:
            return cache[name]
        task, _, how = name.partition(":")
        ck = tiny_ckpt(task)
        model = _model(ck, task)
        if how in ("task", "plugin", "fp16"):
            kw = {"plugin": dict(flavor="plugin"), "fp16": dict(precision="fp16")}.get(how, {})
            mpath = export_task(task, SIDE, ckpt=ck, out=root / how, progress=False, **kw)
            cache[name] = dict(kind="task", task=task, model=model, ckpt=ck, dir=mpath.parent,
                               manifest=Manifest.load(mpath.parent, task=task))
        elif how == "cli":  # through sgex-export's main(): test_export_cli.py checks its output
            import contextlib
            import io
            import logging

            from export.cli import main

            out, err, level = io.StringIO(), io.StringIO(), logging.getLogger().level
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    rc = main(["--task", task, "--res", str(SIDE), "--ckpt", ck, "--out", str(root / how)])
            finally:
                logging.getLogger().setLevel(level)
            assert rc == 0, err.getvalue()
            d = root / how / task
            m = Manifest.load(d, task=task)
            cache[name] = dict(kind="task", task=task, model=model, ckpt=ck, dir=d, manifest=m,
                               cli=(rc, out.getvalue(), err.getvalue(), m))
        else:  # "graph": only the per-bucket graph
            graph = get_task(task).graphs[-1]
            path = root / "graphs" / task / f"{graph}.onnx"
            entry = export_graph(model, task, graph, path, side=SIDE)
            cache[name] = dict(kind="graph", task=task, model=model, ckpt=ck, path=path, entry=entry)
        return cache[name]

    return get


PARITY = {  # task -> artifact holding its per-bucket graph
    "superres": "superres:graph", "edit": "edit:task", "toonify": "toonify:graph",
    "inversion": "inversion:graph", "sketch2face": "sketch2face:task", "mask2face": "mask2face:cli",
}


def _graph_path(a, key):
    if a["kind"] == "graph":
        return a["path"]
    return a["manifest"].path(a["dir"], key)


def _inputs(task, model, graph, b, h, w, seed):
    """(numpy feeds, torch reference output) for one call; identical explicit noise on both sides."""
    t = get_task(task)
    rng = np.random.default_rng(seed)
    D = model.style_dim

    def rn(*s):
        return rng.standard_normal(s).astype(np.float32)

    if graph == "style":
        x2 = np.clip(rn(b, 3, 256, 256) * 0.5, -1, 1)
        with torch.no_grad():
            ref = model.style(torch.from_numpy(x2)).numpy()
        return {"x2": x2}, ref
    noises = [rn(b, 1, hh, ww) for hh, ww in noise_shapes(h, w)] if t.noise == "random" else None
    feeds = {}
    if graph == "synth":
        feeds["x1"] = np.clip(rn(b, 3, h, w) * 0.5, -1, 1)
        feeds["wplus"] = rn(b, 18, D) * 0.5 + model.latent_avg.numpy()[None]
        ew = None
        if t.editing:
            ew = 1.5 * np.repeat(model.editing_w[0:1].numpy(), b, axis=0)
            feeds["editing_w"] = ew
        with torch.no_grad():
            ref = model.synth(torch.from_numpy(feeds["x1"]), torch.from_numpy(feeds["wplus"]),
                              None if ew is None else torch.from_numpy(ew),
                              None if noises is None else [torch.from_numpy(n) for n in noises])
    else:
        if t.in_channels == 1:
            feeds["x"] = rng.random((b, 1, h, w), dtype=np.float32)
        else:
            lab = rng.integers(0, t.in_channels, (b, h, w))
            feeds["x"] = np.eye(t.in_channels, dtype=np.float32)[lab].transpose(0, 3, 1, 2).copy()
        feeds["z"] = rn(b, D)
        with torch.no_grad():
            ref = model.translate(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["z"]),
                                  None if noises is None else [torch.from_numpy(n) for n in noises])
    if noises is not None:
        feeds.update({f"noise_{j}": n for j, n in enumerate(noises)})
    return feeds, ref.numpy()


def _tol(ref) -> float:
    return ATOL * max(1.0, float(np.abs(ref).max()))


def _max_diff(sess, feeds, ref):
    got = sess.run(None, feeds)[0]
    assert got.shape == ref.shape and got.dtype == np.float32
    return float(np.abs(got - ref).max())


@pytest.mark.parametrize("task", list(TASKS))
def test_ort_matches_reference(art, task):
    a = art(PARITY[task])
    graph = get_task(task).graphs[-1]
    sess = ort_session(_graph_path(a, f"{graph}@{SIDE}"))
    for i, (b, h, w) in enumerate(SHAPES):
        feeds, ref = _inputs(task, a["model"], graph, b, h, w, seed=i)
        assert np.isfinite(ref).all() and np.abs(ref).max() > 1e-3
        d = _max_diff(sess, feeds, ref)
        print(f"{task} {graph} {(b, h, w)}: max|diff| {d:.3g}, max|ref| {np.abs(ref).max():.3g}")
        assert d <= _tol(ref), f"{task} {graph} at {(b, h, w)}: max |diff| {d:.3g} (max |ref| {np.abs(ref).max():.3g})"


def test_style_graph_matches_reference(art):
    a = art("edit:task")
    sess = ort_session(a["manifest"].path(a["dir"], "style"))
    for b in (1, 3):  # dynamic batch, traced at 2
        feeds, ref = _inputs("edit", a["model"], "style", b, 0, 0, seed=b)
        assert _max_diff(sess, feeds, ref) <= _tol(ref)


def test_graph_is_dynamic(art):
    """One file: symbolic batch/height/width in the graph, runs at two heights, widths and batches."""
    a = art("superres:graph")
    m = onnx.load(str(a["path"]), load_external_data=False)
    dims = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in list(m.graph.input) + list(m.graph.output)}
    assert dims["x1"] == ["batch", 3, "height", "width"]
    assert dims["noise_16"] == ["batch", 1, "4*height", "4*width"]
    assert dims["y"] == ["batch", 3, "4*height", "4*width"]
    sess = ort_session(a["path"])
    for b, h, w in ((1, 8, 8), (1, 32, 32), (3, 64, 24)):  # 8x8: the smallest x1 (f is 1x1; TensorRT profile min)
        feeds, ref = _inputs("superres", a["model"], "synth", b, h, w, seed=7)
        assert sess.run(None, feeds)[0].shape == (b, 3, 4 * h, 4 * w)
        assert _max_diff(sess, feeds, ref) <= _tol(ref)


def test_task_artifacts_and_manifest(art):
    a = art("edit:task")
    m, d = a["manifest"], a["dir"]
    m.verify(d)
    assert m.task == "edit" and m.precision == "fp32" and m.flavor == "portable" and m.noise == "zero"
    assert sorted(m.graphs) == ["style", f"synth@{SIDE}"]
    assert [b.side for b in m.buckets()] == [SIDE]
    g = m.graph(f"synth@{SIDE}")
    assert [i["name"] for i in g["inputs"]] == ["x1", "wplus", "editing_w"]
    assert g["dims"]["height"] == {"min": 8, "max": SIDE // 4, "multiple": 8}
    assert m.checkpoint["random"] is True and len(m.checkpoint["sha256"]) == 64
    assert {"sgex", "torch", "onnx", "opset"} <= set(m.versions)
    ew = np.load(d / "editing_w.npy")
    assert ew.dtype == np.float32 and ew.shape == (1, 18, m.style_dim)
    np.testing.assert_array_equal(ew, a["model"].editing_w[0:1].numpy())
    for key in m.graphs:
        p = m.path(d, key)
        proto = onnx.load(str(p), load_external_data=False)
        assert proto.ir_version == 10
        assert not list(p.parent.glob("*.data")) and not list(p.parent.glob(".*"))
        onnx.checker.check_model(str(p), full_check=True)
        inputs, outputs = graph_io("edit", m.graph(key)["graph"], m.style_dim)
        assert m.graph(key)["inputs"] == inputs and m.graph(key)["outputs"] == outputs
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_noise_inputs_only_for_random_noise_tasks():
    for task, t in TASKS.items():
        names = [i["name"] for i in graph_io(task, t.graphs[-1], 128)[0]]
        assert (f"noise_{16}" in names) == (t.noise == "random"), task
        assert len([n for n in names if n.startswith("noise_")]) in (0, 17)


def test_merge_refuses_other_precision(art, tiny_ckpt):
    a = art("edit:task")
    before = sorted(p.relative_to(a["dir"]) for p in a["dir"].rglob("*"))
    with pytest.raises(SgexError, match="precision differs"):
        export_task("edit", SIDE, ckpt=tiny_ckpt("edit"), out=a["dir"].parent, precision="fp16", progress=False)
    with pytest.raises(SgexError, match="checkpoint differs"):
        export_task("edit", SIDE, ckpt=tiny_ckpt("edit", seed=1), out=a["dir"].parent, progress=False)
    assert sorted(p.relative_to(a["dir"]) for p in a["dir"].rglob("*")) == before


def test_plugin_flavor_matches_portable_and_reference(art):
    from kernels.onnx_op import DOMAIN, OP_TYPE

    plug, port = art("sketch2face:plugin"), art("sketch2face:task")
    key = f"translate@{SIDE}"
    assert plug["manifest"].flavor == "plugin"
    proto = onnx.load(str(plug["manifest"].path(plug["dir"], key)))
    assert any(o.domain == DOMAIN for o in proto.opset_import)
    n_fused = sum(n.op_type == OP_TYPE and n.domain == DOMAIN for n in proto.graph.node)
    # stride-1 modulated convs: conv1, dilated convs.0/2/4, the 8 odd convs, to_rgb1, to_rgbs.0..7
    # (the stride-2 up-convs convs.6..14 are a conv_transpose2d, not the fused op)
    assert n_fused == 1 + 3 + 8 + 1 + 8
    s_plug = ort_session(plug["manifest"].path(plug["dir"], key))  # flavor read from the file
    s_port = ort_session(port["manifest"].path(port["dir"], key))
    for i, (b, h, w) in enumerate(SHAPES[:2]):
        feeds, ref = _inputs("sketch2face", plug["model"], "translate", b, h, w, seed=10 + i)
        y_plug = s_plug.run(None, feeds)[0]
        y_port = s_port.run(None, feeds)[0]
        assert np.abs(y_plug - ref).max() <= _tol(ref)
        assert np.abs(y_plug - y_port).max() <= _tol(ref)


def test_plugin_flavor_fp16_typing(art):
    """FP16 plugin graphs are for TensorRT (the ORT Python op is float32 only): the converter keeps
    each fused node's style / noise_strength FP32 (type S) and the rest FP16, and onnx.checker
    validates the node against its registered schema."""
    from export.fp16 import convert_to_fp16, default_plan
    from kernels.onnx_op import OP_TYPE, register_onnx_schema

    plug = art("sketch2face:plugin")
    register_onnx_schema()
    plan = default_plan("sketch2face")
    proto = onnx.load(str(plug["manifest"].path(plug["dir"], f"translate@{SIDE}")))
    m16 = convert_to_fp16(proto, plan["graphs"]["translate"], plan["rules"])
    onnx.checker.check_model(m16, full_check=True)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in m16.graph.value_info}
    types.update({i.name: i.data_type for i in m16.graph.initializer})
    F, H = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    fused = [n for n in m16.graph.node if n.op_type == OP_TYPE]
    half = [n for n in fused if types.get(n.input[0]) == H]
    assert len(half) >= len(fused) - 2  # all but the default plan's decoder.conv1 / to_rgb1
    for n in half:
        assert [types.get(n.input[i]) for i in range(6)] == [H, H, F, H, F, H], n.name


def psnr(ref, got):
    """PSNR over the reference's dynamic range (outputs are unclamped)."""
    peak = float(ref.max() - ref.min())
    mse = float(np.mean((ref.astype(np.float64) - got.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


@pytest.mark.slow
def test_fp16_task_export(art):
    """export_task --precision fp16: runs on ORT CPU, FP32 I/O, no FP16 tensor in a plan-FP32
    node, PSNR >= 35 dB against the FP32 reference."""
    from export.fp16 import default_plan, fp32_reasons, node_compute_dtypes

    a = art("mask2face:fp16")
    m = a["manifest"]
    assert m.precision == "fp16" and m.data["plan"]["source"] == "default"
    key = f"translate@{SIDE}"
    path = m.path(a["dir"], key)
    proto = onnx.load(str(path))
    H = onnx.TensorProto.FLOAT16
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
               for v in list(proto.graph.input) + list(proto.graph.output))
    dt = node_compute_dtypes(proto)
    assert sum(H in s for s in dt.values()) > 50  # the bulk really is FP16
    ref32 = art("mask2face:cli")
    fp32 = onnx.load(str(ref32["manifest"].path(ref32["dir"], key)))
    plan = default_plan("mask2face")
    keep = fp32_reasons(fp32, plan["graphs"]["translate"], plan["rules"])
    assert any(r == "scope" for r in keep.values()) and any(r == "vector" for r in keep.values())
    bad = [n for n in keep if H in dt.get(n, set())]
    assert not bad, f"plan-FP32 nodes with FP16 tensors: {bad[:5]}"
    sess = ort_session(path)
    for i, (b, h, w) in enumerate(SHAPES):
        feeds, ref = _inputs("mask2face", a["model"], "translate", b, h, w, seed=20 + i)
        got = sess.run(None, feeds)[0]
        assert got.dtype == np.float32 and np.isfinite(got).all()
        print(f"fp16 export mask2face {(b, h, w)}: PSNR {psnr(ref, got):.1f} dB")
        assert psnr(ref, got) >= PSNR_MIN, f"PSNR {psnr(ref, got):.1f} dB at {(b, h, w)}"


@pytest.mark.parametrize("name, graph", [("edit:task", "style"), ("edit:task", "synth"),
                                         ("superres:graph", "synth"), ("sketch2face:task", "translate"),
                                         ("mask2face:cli", "translate")])
def test_fp16_conversion_of_exported_graphs(art, name, graph):
    """convert_to_fp16 on the shared FP32 exports: checker, ORT CPU, PSNR vs the FP32 reference."""
    from export.fp16 import convert_to_fp16, default_plan, fp32_reasons, node_compute_dtypes

    a = art(name)
    task = a["task"]
    key = graph if graph == "style" else f"{graph}@{SIDE}"
    plan = default_plan(task)
    fp32 = onnx.load(str(_graph_path(a, key)))
    m16 = convert_to_fp16(fp32, plan["graphs"][graph], plan["rules"])
    onnx.checker.check_model(m16, full_check=True)
    keep = fp32_reasons(fp32, plan["graphs"][graph], plan["rules"])
    dt = node_compute_dtypes(m16)
    H = onnx.TensorProto.FLOAT16
    assert not [n for n in keep if H in dt.get(n, set())], "plan-FP32 node with an FP16 tensor"
    assert sum(H in v for v in dt.values()) > 0.3 * len(dt), "the bulk of the graph should be FP16"
    if graph != "style":
        assert any(r == "scope" for r in keep.values())  # decoder.conv1 / to_rgb1 of the default plan
    assert any(r == "vector" for r in keep.values())
    import onnxruntime as ort

    sess = ort.InferenceSession(m16.SerializeToString(), providers=["CPUExecutionProvider"])
    b, h, w = SHAPES[1]
    feeds, ref = _inputs(task, a["model"], graph, b, h, w, seed=30)
    got = sess.run(None, feeds)[0]
    print(f"fp16 {task} {graph} {(b, h, w)}: PSNR {psnr(ref, got):.1f} dB, max|diff| "
          f"{np.abs(got - ref).max():.3g}, max|ref| {np.abs(ref).max():.3g}")
    assert psnr(ref, got) >= PSNR_MIN, f"{task} {graph}: PSNR {psnr(ref, got):.1f} dB"


@pytest.mark.slow
def test_second_bucket_merges_and_reuses_style(art, tiny_ckpt):
    """Exporting bucket 128 into the edit directory adds synth@128 and keeps the style graph file."""
    a = art("edit:task")
    style = a["manifest"].path(a["dir"], "style")
    before = (style.stat().st_mtime_ns, a["manifest"].graph("style")["sha256"])
    export_task("edit", 128, ckpt=tiny_ckpt("edit"), out=a["dir"].parent, progress=False)
    m = Manifest.load(a["dir"], task="edit")
    m.verify(a["dir"])
    assert sorted(m.graphs) == ["style", "synth@128", f"synth@{SIDE}"]
    assert [b.side for b in m.buckets()] == [128, SIDE]
    assert (style.stat().st_mtime_ns, m.graph("style")["sha256"]) == before
    sess = ort_session(m.path(a["dir"], "synth@128"))
    feeds, ref = _inputs("edit", a["model"], "synth", 2, 32, 32, seed=40)
    assert _max_diff(sess, feeds, ref) <= _tol(ref)
    a["manifest"] = m


@pytest.mark.slow
def test_full_size_export(tmp_path):
    """width_div=1 (official sizes) toonify at bucket 384: sizes under 2 GB, single files, parity."""
    import time

    t0 = time.perf_counter()
    mpath = export_task("toonify", SIDE, random_weights=True, out=tmp_path, progress=True)
    elapsed = time.perf_counter() - t0
    m = Manifest.load(mpath.parent, task="toonify")
    m.verify(mpath.parent)
    style = m.path(mpath.parent, "style")
    size = style.stat().st_size
    assert 0.9e9 < size < 2**31, size
    assert not list(mpath.parent.rglob("*.data"))
    from export.checkpoint import build_model, load_or_random

    ck = load_or_random("toonify", None, True, seed=0)
    model, model64 = build_model(ck, "toonify"), build_model(ck, "toonify").double()
    for key, graph in (("style", "style"), (f"synth@{SIDE}", "synth")):
        sess = ort_session(m.path(mpath.parent, key))
        feeds, ref = _inputs("toonify", model, graph, 1, 64, 32, seed=0)
        got = sess.run(None, feeds)[0]
        # A random full-width encoder (identity BN statistics, no normalisation) is ill-conditioned:
        # PyTorch float32 itself is ~1e-3 relative off float64 on the style code. Require ONNX
        # Runtime to be within 1e-4 relative or within 10x of PyTorch float32's own error.
        args = {k: torch.from_numpy(v).double() for k, v in feeds.items()}
        with torch.no_grad():
            ref64 = (model64.style(args["x2"]) if graph == "style" else
                     model64.synth(args["x1"], args["wplus"])).numpy()
        err32, err_ort = np.abs(ref - ref64).max(), np.abs(got - ref64).max()
        print(f"full-size {key}: max|ort-ref32| {np.abs(got - ref).max():.3g}, max|ref32-ref64| {err32:.3g}, "
              f"max|ort-ref64| {err_ort:.3g}, max|ref| {np.abs(ref).max():.3g}")
        assert err_ort <= max(_tol(ref), 10 * err32), key
    print(json.dumps({"elapsed_s": round(elapsed, 1), "style_bytes": size}))


def test_cli_export_success(art):
    """sgex-export main() exported mask2face at bucket 384 (checked against the reference in
    test_ort_matches_reference): exit 0, the manifest path on stdout, stage lines with timings."""
    import os

    rc, stdout, stderr, manifest = art("mask2face:cli")["cli"]
    assert rc == 0
    assert stdout.strip().endswith("manifest.json") and os.path.isfile(stdout.strip())
    assert f"[1/1] exporting translate@{SIDE} (fp32, portable) ..." in stderr
    assert f"[1/1] exporting translate@{SIDE} (fp32, portable) done in" in stderr
    assert manifest.precision == "fp32" and manifest.task == "mask2face"
    assert list(manifest.graphs) == [f"translate@{SIDE}"]
    assert manifest.buckets()[0].max_input == SIDE // 4


@pytest.mark.parametrize("name", ["edit:task", "sketch2face:task", "mask2face:cli"])
def test_engine_on_ort_at_official_crop_sizes_equals_the_reference(art, name):
    """runtime.Engine on these task exports at x1 sizes that are multiples of 8 but not of 16 or 32
    (and at a multiple of 32): the reference model called directly at that size, with the Engine's
    documented seeded inputs, within the tolerance above. (superres: tests/runtime/test_engine.py.)"""
    from runtime import io as rio
    from runtime.engine import Engine, make_random_inputs

    a = art(name)
    task, model = a["task"], a["model"]
    eng = Engine(a["dir"], backend="ort", task=task)
    t = get_task(task)
    for i, (b, h, w) in enumerate(SHAPES):
        rng = np.random.default_rng(50 + i)
        seeds = [i + 1, i + 2][:b]
        rand = make_random_inputs(seeds, b, h, w, noise=t.noise == "random", z_dim=model.style_dim if t.inject else None)
        noises = [torch.from_numpy(rand[f"noise_{j}"]) for j in range(17)] if t.noise == "random" else None
        with torch.no_grad():
            if t.graphs[-1] == "translate":
                x = rng.integers(0, 19 if t.input_kind == "mask" else 256, (b, h, w), dtype=np.uint8)
                got = eng.translate_float(x, seed=seeds)
                mx = rio.mask_to_model(x) if t.input_kind == "mask" else rio.sketch_to_model(x)
                ref = model.translate(torch.from_numpy(mx), torch.from_numpy(rand["z"]), noises).numpy()
            else:
                x = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
                wplus = (rng.standard_normal((b, 18, model.style_dim)) * 0.5).astype(np.float32)
                wplus += model.latent_avg.numpy()[None]
                got = eng.synthesize_float(x, wplus, seed=seeds, edit_scale=-2.0)
                ew = torch.from_numpy(np.repeat(-2.0 * eng.editing_w, b, axis=0)) if t.editing else None
                ref = model.synth(torch.from_numpy(rio.rgb_to_model(x)), torch.from_numpy(wplus), ew, noises).numpy()
        assert got.shape == ref.shape == (b, 3, 4 * h, 4 * w)
        d = float(np.abs(got - ref).max())
        assert d <= _tol(ref), f"{name} at {(b, h, w)}: max |diff| {d:.3g} (max |ref| {np.abs(ref).max():.3g})"

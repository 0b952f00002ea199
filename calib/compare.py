"""Accuracy of an artifact against the FP32 reference: per output, per graph, per bucket.

Metrics per output over a calibration set (all float32 after casting the candidate):

    max_abs_diff   max |cand - ref| over finite elements of every sample
    psnr           worst sample of 10*log10(peak^2 / MSE), peak = max(ref) - min(ref) of that sample
                   (the reference's data range: 2 for an image in [-1, 1]); -inf when the
                   candidate has NaN/Inf, inf when identical
    psnr_mean      mean over samples (of the finite ones)
    nan, inf       counts in the candidate (ref_nan, ref_inf for the reference)

Graphs are run through Polygraphy's `Comparator.run` with one `OnnxrtRunner` per model (ONNX
Runtime CPU, no TensorRT; the session factory registers the sgex custom op when a graph uses it),
streaming one sample at a time so memory stays flat. Polygraphy's own `compare_accuracy` reports
per-element tolerance pass/fail, not PSNR, so the metrics are computed here from its RunResults.

`compare_artifacts` compares two exported task directories (e.g. an FP16 export against the FP32
export of the same checkpoint): each graph on identical inputs, plus the end-to-end pipeline of
RGB tasks (the candidate's own style code fed to its synth graph), for every bucket both have.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from calib.ranges import SessionFactory, default_session, load_model


def psnr(ref: np.ndarray, cand: np.ndarray) -> float:
    """10*log10(peak^2 / MSE) with peak = the reference's data range; -inf if cand is not finite."""
    ref = np.asarray(ref, np.float64)
    cand = np.asarray(cand, np.float64)
    if not np.isfinite(cand).all():
        return -math.inf
    mse = float(np.mean((ref - cand) ** 2))
    if mse == 0.0:
        return math.inf
    peak = float(ref.max() - ref.min()) if ref.size else 0.0
    if peak == 0.0:
        peak = max(float(np.abs(ref).max()), 1.0)
    return 10.0 * math.log10(peak * peak / mse)


@dataclass
class OutputMetrics:
    output: str
    shape: list[int] = field(default_factory=list)
    samples: int = 0
    max_abs_diff: float = 0.0
    psnr: float = math.inf
    psnr_mean: float = math.inf
    nan: int = 0
    inf: int = 0
    ref_nan: int = 0
    ref_inf: int = 0
    _psnrs: list = field(default_factory=list, repr=False)

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref = np.asarray(ref, np.float32)
        cand = np.asarray(cand).astype(np.float32)
        if ref.shape != cand.shape:
            raise ValueError(f"output {self.output}: shape {list(cand.shape)} != reference {list(ref.shape)}")
        self.shape = list(ref.shape)
        self.samples += 1
        self.nan += int(np.isnan(cand).sum())
        self.inf += int(np.isinf(cand).sum())
        self.ref_nan += int(np.isnan(ref).sum())
        self.ref_inf += int(np.isinf(ref).sum())
        both = np.isfinite(ref) & np.isfinite(cand)
        if both.any():
            self.max_abs_diff = max(self.max_abs_diff, float(np.abs(ref[both] - cand[both]).max()))
        p = psnr(ref, cand)
        self._psnrs.append(p)
        self.psnr = min(self._psnrs)
        finite = [v for v in self._psnrs if math.isfinite(v)]
        self.psnr_mean = float(np.mean(finite)) if finite else self.psnr

    @property
    def finite(self) -> bool:
        return self.nan == 0 and self.inf == 0

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("_psnrs")
        for k in ("psnr", "psnr_mean"):
            d[k] = _json_float(d[k])
        return d


def _json_float(v: float):
    """JSON has no inf/nan: write them as strings."""
    if math.isfinite(v):
        return round(float(v), 4)
    return "inf" if v > 0 else ("-inf" if v < 0 else "nan")


def emulate_fp16(model):
    """An FP32 graph that computes what an FP16 graph computes with FP16 storage.

    Why: ONNX Runtime's CPU provider has no FP16 kernels for most ops; it runs them in FP32 and
    removes its own Cast pairs between neighbouring FP16 nodes, so on CPU an FP16 graph never
    rounds or overflows where FP16 hardware would (checked on onnxruntime 1.31: fp16 x*x with
    x=1000 followed by sqrt gives 1000, not inf). Here every FP16 tensor becomes an FP32 tensor
    that has been through an explicit Cast to FP16 and back (ONNX Runtime keeps casts that the
    graph itself contains): each op computes in FP32 and stores its result rounded to FP16,
    overflowing to +-inf beyond 65504 -- the storage semantics of TensorRT's FP16 kernels, which
    accumulate in FP32. FP16 initializers become FP32 copies of their FP16 values. An FP32 graph
    is returned unchanged (same object). Tensor names are kept, so intermediates can be compared
    with the FP32 reference by name.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    F, H = TensorProto.FLOAT, TensorProto.FLOAT16
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.value_info) + list(g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:
        if n.op_type == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            types[n.output[0]] = to
    if not any(t == H for t in types.values()):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, init in enumerate(g.initializer):
        if init.data_type == H:
            arr = numpy_helper.to_array(init).astype("float32")
            g.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == H:
            vi.type.tensor_type.elem_type = F
    # value infos (retyped) keep ONNX Runtime's session set-up fast: without them it re-infers
    # every shape (seconds per session on a 4000-node graph)
    infos = {vi.name: vi for vi in g.value_info}
    extra = []

    def info(name, like, dtype):
        if like in infos:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(infos[like])
            vi.name = name
            vi.type.tensor_type.elem_type = dtype
            extra.append(vi)

    nodes = []
    for n in g.node:
        outs16 = [i for i, o in enumerate(n.output) if o and types.get(o) == H]
        if not outs16:
            nodes.append(n)
            continue
        is_cast = n.op_type == "Cast"
        for a in n.attribute:  # dtype attributes of FP16 nodes back to FP32 (the Cast keeps its own)
            if a.name == "dtype" and a.i == H:
                a.i = F
            if a.name == "value" and n.op_type == "ConstantOfShape" and a.t.data_type == H:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype("float32"), a.t.name))
        tail = []
        for i in outs16:
            o = n.output[i]
            if is_cast:
                n.output[i] = f"{o}__emu16"
                info(n.output[i], o, H)
                tail.append(helper.make_node("Cast", [n.output[i]], [o], to=F, name=f"{n.name}__emu_{i}"))
            else:
                n.output[i] = f"{o}__emu32"
                info(n.output[i], o, F)
                info(f"{o}__emu16", o, H)
                tail.append(helper.make_node("Cast", [n.output[i]], [f"{o}__emu16"], to=H, name=f"{n.name}__emu16_{i}"))
                tail.append(helper.make_node("Cast", [f"{o}__emu16"], [o], to=F, name=f"{n.name}__emu32_{i}"))
        nodes.append(n)
        nodes.extend(tail)
    for vi in g.value_info:
        if vi.type.tensor_type.elem_type == H:
            vi.type.tensor_type.elem_type = F
    g.value_info.extend(extra)
    del g.node[:]
    g.node.extend(nodes)
    return m


def _quiet_polygraphy():
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR


def run_polygraphy(
    models: dict[str, object],
    feeds_list: list[dict[str, np.ndarray]],
    *,
    session: SessionFactory = default_session,
    on_iteration: Callable[[dict[str, dict[str, np.ndarray]]], None],
) -> None:
    """Run every model (name -> ModelProto) on each feed dict with Polygraphy's Comparator
    (streaming) and call on_iteration({model name: {output: array}}) once per sample."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    _quiet_polygraphy()
    runners = [OnnxrtRunner((lambda m=load_model(m): session(m)), name=name) for name, m in models.items()]
    for results in Comparator.run(runners, data_loader=feeds_list, streaming=True):
        per_model = {name: dict(iters[0].items()) for name, iters in results.items()}
        on_iteration(per_model)


def compare_graphs(
    reference,
    candidate,
    feeds_list: list[dict[str, np.ndarray]],
    *,
    session: SessionFactory = default_session,
    emulate: bool = True,
) -> dict[str, OutputMetrics]:
    """Per-output metrics of `candidate` against `reference` (ModelProtos or paths) on the same
    feeds. emulate: run an FP16 candidate with emulate_fp16 (ONNX Runtime CPU would otherwise
    compute it in FP32 and hide FP16 overflow)."""
    candidate = load_model(candidate)
    if emulate:
        candidate = emulate_fp16(candidate)
    metrics: dict[str, OutputMetrics] = {}

    def on_iteration(res):
        ref, cand = res["reference"], res["candidate"]
        for name, r in ref.items():
            if name not in cand:
                raise ValueError(f"candidate graph has no output {name!r}")
            metrics.setdefault(name, OutputMetrics(name)).add(r, cand[name])

    run_polygraphy({"reference": reference, "candidate": candidate}, feeds_list, session=session, on_iteration=on_iteration)
    return metrics


@dataclass
class Report:
    """Rows of {bucket, graph, output, metrics...}; JSON and a short markdown table."""

    title: str
    rows: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def add(self, bucket: int | None, graph: str, metrics: dict[str, OutputMetrics]) -> None:
        for m in metrics.values():
            self.rows.append({"bucket": bucket, "graph": graph, **m.to_json()})

    def worst_psnr(self) -> float:
        vals = [_parse_float(r["psnr"]) for r in self.rows]
        return min(vals) if vals else math.inf

    def to_json(self) -> dict:
        return {"format": "sgex-accuracy-report", "version": 1, "title": self.title, "meta": self.meta, "rows": self.rows}

    def to_markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        for k, v in self.meta.items():
            lines.append(f"- {k}: {v}")
        if self.meta:
            lines.append("")
        lines.append("| bucket | graph | output | shape | samples | max abs diff | PSNR dB (worst / mean) | NaN | Inf |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in self.rows:
            shape = "x".join(str(s) for s in r["shape"])
            lines.append(
                f"| {r['bucket'] if r['bucket'] is not None else '-'} | {r['graph']} | {r['output']} | {shape} | "
                f"{r['samples']} | {r['max_abs_diff']:.3g} | {_fmt_db(r['psnr'])} / {_fmt_db(r['psnr_mean'])} | "
                f"{r['nan']} | {r['inf']} |"
            )
        return "\n".join(lines) + "\n"


def _parse_float(v) -> float:
    return float(v)


def _fmt_db(v) -> str:
    v = _parse_float(v)
    return f"{v:.1f}" if math.isfinite(v) else str(v)


def compare_artifacts(
    candidate_dir: str,
    reference_dir: str,
    *,
    data: str | None = None,
    samples: int = 4,
    seed: int = 0,
    session: SessionFactory = default_session,
    emulate: bool = True,
) -> Report:
    """Compare the ONNX graphs of two exported directories of the same task (candidate, e.g. FP16,
    against reference, FP32) on calibration inputs, for every bucket both have.

    Rows: "style" (same x2), "<graph>@<side>" (same inputs, the reference's wplus) and, for RGB
    tasks, "pipeline@<side>" (each artifact's own wplus into its own synth graph). emulate: run
    FP16 candidates with FP16 storage emulated (see emulate_fp16); False runs them as ONNX
    Runtime CPU does, which hides FP16 overflow."""
    from calib.data import graph_feeds, load_samples
    from runtime.manifest import Manifest

    cand_m = Manifest.load(candidate_dir)
    ref_m = Manifest.load(reference_dir, task=cand_m.task)
    cand_m.verify(candidate_dir, [k for k in cand_m.graphs])
    ref_m.verify(reference_dir, [k for k in ref_m.graphs])
    task = cand_m.task
    style_dim = ref_m.style_dim
    editing_w = None
    if "editing_w.npy" in ref_m.files:
        editing_w = np.load(Path(reference_dir) / "editing_w.npy")
    report = Report(
        f"{task}: {cand_m.precision}/{cand_m.flavor} vs {ref_m.precision}/{ref_m.flavor} (ONNX Runtime CPU)",
        meta={"candidate": str(candidate_dir), "reference": str(reference_dir), "samples": samples, "seed": seed,
              "data": data or "synthetic",
              "fp16": "emulated (FP32 compute, FP16 storage)" if emulate else "as ONNX Runtime CPU runs it"},
    )
    graph_name = ref_m.bucket_graph_name()
    sides = sorted({b.side for b in ref_m.buckets()} & {b.side for b in cand_m.buckets()})
    if not sides:
        from runtime.errors import SgexError

        raise SgexError(f"{candidate_dir} and {reference_dir} share no bucket")
    has_style = "style" in ref_m.graphs
    for side in sides:
        sample_list = load_samples(task, side, data, samples, seed)
        key = f"{graph_name}@{side}"
        ref_graph = load_model(str(ref_m.path(reference_dir, key)))
        cand_graph = load_model(str(cand_m.path(candidate_dir, key)))
        if emulate:
            cand_graph = emulate_fp16(cand_graph)
        inputs = [i.name for i in ref_graph.graph.input]
        if has_style:
            ref_style = load_model(str(ref_m.path(reference_dir, "style")))
            cand_style = load_model(str(cand_m.path(candidate_dir, "style")))
            if emulate:
                cand_style = emulate_fp16(cand_style)
            style_feeds = [{"x2": s.x2} for s in sample_list]
            wplus: dict[str, list[np.ndarray]] = {"reference": [], "candidate": []}
            style_metrics: dict[str, OutputMetrics] = {}

            def on_style(res, wplus=wplus, style_metrics=style_metrics):
                for n in ("reference", "candidate"):
                    wplus[n].append(res[n]["wplus"])
                style_metrics.setdefault("wplus", OutputMetrics("wplus")).add(res["reference"]["wplus"], res["candidate"]["wplus"])

            run_polygraphy({"reference": ref_style, "candidate": cand_style}, style_feeds, session=session, on_iteration=on_style)
            if side == sides[0]:
                report.add(None, "style", style_metrics)
            feeds = [graph_feeds(inputs, s, style_dim=style_dim, wplus=wplus["reference"][i], editing_w=editing_w, index=i)
                     for i, s in enumerate(sample_list)]
            report.add(side, key, compare_graphs(ref_graph, cand_graph, feeds, session=session, emulate=False))
            own = [graph_feeds(inputs, s, style_dim=style_dim, wplus=wplus["candidate"][i], editing_w=editing_w, index=i)
                   for i, s in enumerate(sample_list)]
            pipe: dict[str, OutputMetrics] = {}
            ref_sess, cand_sess = session(ref_graph), session(cand_graph)
            for f_ref, f_own in zip(feeds, own):
                r = ref_sess.run(None, f_ref)
                c = cand_sess.run(None, f_own)
                for o, rv, cv in zip(ref_sess.get_outputs(), r, c):
                    pipe.setdefault(o.name, OutputMetrics(o.name)).add(rv, cv)
            report.add(side, f"pipeline@{side}", pipe)
        else:
            feeds = [graph_feeds(inputs, s, style_dim=style_dim, index=i) for i, s in enumerate(sample_list)]
            report.add(side, key, compare_graphs(ref_graph, cand_graph, feeds, session=session, emulate=False))
    return report


def write_report(report: Report, json_path: str | None, md_path: str | None) -> None:
    from runtime.manifest import atomic_write_text

    if json_path:
        atomic_write_text(json_path, json.dumps(report.to_json(), indent=2) + "\n")
    if md_path:
        atomic_write_text(md_path, report.to_markdown())

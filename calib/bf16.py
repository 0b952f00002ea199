"""The BF16 accuracy gate of the OpenVINO backend: BF16 against FP32, per output, per graph, per
bucket, with FP32 islands where a graph misses the target.

Both sides run on OpenVINO's CPU plugin from the same verified bytes (runtime/backends/openvino.py):
the reference with inference precision f32, the candidate with bf16, so the measured difference is
BF16 and nothing else. Inputs are the calibration set of calib.data (a folder, a video or seeded
synthetic inputs); synth graphs get the FP32 style graph's w+ of each sample (every graph is
gated on FP32 inputs, as the FP16 plan is).

Metrics per output (calib.compare.OutputMetrics): worst-sample PSNR with the reference's range as
peak, max |diff|, NaN/Inf counts. A graph passes when every output is finite and its worst PSNR
reaches `target_psnr`. When it does not, units -- layer scopes of the ONNX graph
(calib.ranges.layer_scope: "decoder.convs.3", "encoder.body.7"), or single nodes outside any
layer -- are moved to FP32 in graph order, shortest prefix that passes, found by doubling and
bisection (each probe is a compile and a run of the calibration set). Graph order because error
injected early is amplified by every layer after it; the ranking is a heuristic, the pass is
measured. FP32 is kept per node with OpenVINO's "precise" runtime attribute
(runtime.backends.openvino.pin_fp32).

Then the pipeline is gated as well, because that is what a user gets: the BF16 style code into
each bucket's BF16 synth graph against the FP32 pipeline. Two graphs that pass on FP32 inputs can
miss together (measured: toonify at output 512, style 57.7 dB and synth 46.2 dB, pipeline 39.3
dB). When it misses, more style units go to FP32 (gate_pipeline), and if pins cannot reach the
target the whole style graph is compiled FP32 (`graph_precision`), which in video mode costs
little (the style code is computed once per clip).

The record (JSON, stored in the manifest under runtime.manifest.BF16_GATE):

    {"format": "sgex-bf16-gate", "version": 2, "passed": bool, "target_psnr": 40.0,
     "openvino": "2026.4.1", "cpu": "...", "samples": 8, "seed": 0, "data": "synthetic",
     "graphs": {"synth@128": {"sha256": <graph sha256>, "passed": bool, "psnr": worst dB,
                              "graph_precision": "bf16" | "fp32", "fp32_units": [...],
                              "fp32_nodes": [...], "probes": n,
                              "outputs": {"y": {psnr, max_abs_diff, nan, inf, ...}}}, ...},
     "pipeline": {"synth@128": {"passed": bool, "psnr": worst dB, "outputs": {...}}}}

A graph's "psnr" and "outputs" are its own BF16 measurement (with its pins); "graph_precision"
"fp32" says the runtime compiles it FP32 all the same. "passed" needs every graph and every
pipeline row to pass; "pipeline" is empty for a task without a style graph (sketch2face,
mask2face: translate).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np

from calib.compare import OutputMetrics, Report, _json_float
from runtime.backends.openvino import GATE_VERSION  # 2: the pipeline gated too, graph_precision per graph
from runtime.errors import SgexError

log = logging.getLogger(__name__)

GATE_FORMAT = "sgex-bf16-gate"
DEFAULT_TARGET_PSNR = 40.0


def fp32_units(onnx_bytes: bytes, op_names: set[str]) -> dict[str, list[str]]:
    """{unit: [ONNX node names]} in graph order (first appearance). Units are layer scopes, or
    "node:<name>" for nodes outside any layer; only nodes that name an OpenVINO op (op_names)
    are listed, since only those can be pinned."""
    import onnx

    from calib.ranges import layer_scope, node_scope

    model = onnx.load_from_string(onnx_bytes)
    units: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.name not in op_names:
            continue
        scope = layer_scope(node_scope(n))
        units.setdefault(scope or f"node:{n.name}", []).append(n.name)
    return units


class _Graph:
    """One graph of the artifact: its verified bytes, the FP32 reference outputs on the feeds,
    and measurements of BF16 under a set of FP32 pins."""

    def __init__(self, core, key: str, data: bytes, feeds: list[dict], threads: int,
                 progress: Callable[[int], None] | None):
        from runtime.backends.openvino import compile_config

        self.core, self.key, self.data, self.feeds, self.progress = core, key, data, feeds, progress
        self.cfg32 = compile_config("fp32", threads, None)
        self.cfg16 = compile_config("bf16", threads, None)
        ref = core.compile_model(core.read_model(data), "CPU", self.cfg32)
        self.outputs = [o.get_any_name() for o in ref.outputs]
        self.ref = [self._run(ref, f) for f in feeds]
        self.op_names = {op.get_friendly_name() for op in core.read_model(data).get_ordered_ops()}

    def _run(self, compiled, feeds: dict) -> dict[str, np.ndarray]:
        req = compiled.create_infer_request()
        req.infer(feeds)
        if self.progress:
            self.progress(1)
        return {n: np.array(req.get_tensor(n).data, dtype=np.float32, copy=True) for n in self.outputs}

    def bf16(self, pins: list[str]):
        from runtime.backends.openvino import pin_fp32

        model = pin_fp32(self.core, self.data, pins) if pins else self.core.read_model(self.data)
        compiled = self.core.compile_model(model, "CPU", self.cfg16)
        compiled._sgex_model = model  # noqa: SLF001  keep a pinned model's weights buffer alive
        return compiled

    def measure(self, pins: list[str]) -> dict[str, OutputMetrics]:
        cand = self.bf16(pins)
        self.last = cand
        metrics = {n: OutputMetrics(n) for n in self.outputs}
        for f, r in zip(self.feeds, self.ref):
            c = self._run(cand, f)
            for n in self.outputs:
                metrics[n].add(r[n], c[n])
        return metrics


def pins_held(compiled, nodes: list[str]) -> dict[str, int]:
    """How many of the compiled graph's compute ops that contain a pinned node run in f32 / bf16
    (OpenVINO's execution graph). The CPU plugin honours the "precise" attribute only on ops that
    keep it through its fusions: in OpenVINO 2026.4.1 a Convolution fused with the preceding
    Multiply/Add and MatMul turned FullyConnected still run BF16, so pins are partial and the
    gate's PSNR (measured on what ran) is what counts."""
    pinned = set(nodes)
    held = {"f32": 0, "bf16": 0}
    for op in compiled.get_runtime_model().get_ordered_ops():
        ri = op.get_rt_info()
        if ri["layerType"].astype(str) in ("Reorder", "Input", "Output", "Const"):
            continue
        if pinned & set(ri["originalLayersNames"].astype(str).split(",")):
            prec = ri["runtimePrecision"].astype(str)
            held["bf16" if prec == "bf16" else "f32"] += 1
    return held


def _passes(metrics: dict[str, OutputMetrics], target: float) -> bool:
    return all(m.finite and m.psnr >= target for m in metrics.values())


def _worst(metrics: dict[str, OutputMetrics]) -> float:
    return min((m.psnr for m in metrics.values()), default=math.inf)


def _shortest_prefix(lo: int, n: int, measure: Callable[[int], tuple[dict, object]], target: float
                     ) -> tuple[int, dict, object, int]:
    """The smallest k in lo+1..n whose measure(k) (metrics, compiled) passes, found by doubling
    then bisection, or n when none does. Returns (k, metrics, compiled, probes). Only the
    compiled model of the best passing probe so far is kept (a full-size compiled graph is
    hundreds of MB)."""
    seen: dict[int, bool] = {}
    best: list = [None, None, None]  # k, metrics, compiled of the smallest passing k so far
    last: list = [None, None, None]

    def ok(k: int) -> bool:
        if k not in seen:
            metrics, compiled = measure(k)
            seen[k] = _passes(metrics, target)
            if seen[k] and (best[0] is None or k < best[0]):
                best[:] = [k, metrics, compiled]
            elif k == n:
                last[:] = [k, metrics, compiled]
        return seen[k]

    base, hi, step = lo, None, 1
    while lo + step <= n:
        k = lo + step
        if ok(k):
            hi = k
            break
        base, step = k, step * 2
    if hi is None:
        if not ok(n):  # n >= base here; ok(n) is cached when the doubling already probed it
            return n, last[1], last[2], len(seen)
        hi = n
    while hi - base > 1:
        mid = (base + hi) // 2
        if ok(mid):
            hi = mid
        else:
            base = mid
    return best[0], best[1], best[2], len(seen)


def gate_graph(g: _Graph, target_psnr: float) -> dict:
    """Measure BF16 with no pins; when it misses the target, the shortest graph-order prefix of
    units in FP32 that passes (doubling then bisection). Returns the graph's record (no sha256)."""
    metrics = g.measure([])
    probes, chosen, nodes = 1, [], []
    if not _passes(metrics, target_psnr):
        units = fp32_units(g.data, g.op_names)
        names = list(units)

        def measure(k: int):
            m = g.measure([n for u in names[:k] for n in units[u]])
            log.info("%s: first %d unit(s) FP32 -> PSNR %.1f dB", g.key, k, _worst(m))
            return m, g.last

        if names:
            k, metrics, g.last, n = _shortest_prefix(0, len(names), measure, target_psnr)
            probes += n
            chosen = names[:k]
            nodes = [n for u in chosen for n in units[u]]
    return {"passed": _passes(metrics, target_psnr), "psnr": _json_float(_worst(metrics)),
            "graph_precision": "bf16", "fp32_units": chosen, "fp32_nodes": nodes, "probes": probes,
            "pins_held": pins_held(g.last, nodes),
            "outputs": {n: m.to_json() for n, m in metrics.items()}, "_metrics": metrics}


class _Pipeline:
    """The image path as the runtime runs it: the BF16 style graph's w+ into each bucket's BF16
    synth graph (with its own pins), against the FP32 pipeline (g.ref of each synth graph)."""

    def __init__(self, style: _Graph, buckets: list[tuple[_Graph, object, Callable[[int, object], dict], list]]):
        self.style, self.buckets = style, buckets  # (synth graph, its BF16 compiled, feeds(i, wplus), style feeds)

    def measure(self, style_compiled) -> dict[str, dict[str, OutputMetrics]]:
        out = {}
        for g, cand, feeds, x2 in self.buckets:
            pipe = {n: OutputMetrics(n) for n in g.outputs}
            for i in range(len(g.feeds)):
                wplus = self.style._run(style_compiled, x2[i])["wplus"]
                c = g._run(cand, feeds(i, wplus))
                for n in g.outputs:
                    pipe[n].add(g.ref[i][n], c[n])
            out[g.key] = pipe
        return out


def _pipeline_passes(per_bucket: dict[str, dict[str, OutputMetrics]], target: float) -> bool:
    return all(_passes(m, target) for m in per_bucket.values())


def gate_pipeline(pipe: _Pipeline, style_rec: dict, target_psnr: float) -> dict[str, dict[str, OutputMetrics]]:
    """Gate the pipeline (BF16 style code into BF16 synth) too: each graph can pass on FP32 inputs
    while the style code's BF16 error, amplified by the synth graph, misses the target. Then more
    style units go to FP32 (graph order, after the style graph's own prefix, shortest that
    passes); when every unit pinned still misses (OpenVINO's pins are partial, see pins_held), the
    whole style graph is compiled FP32 (graph_precision "fp32": the pipeline is then the synth
    graphs on FP32 style codes, which is what their own gate measured). Updates style_rec."""
    style = pipe.style
    per = pipe.measure(style.bf16(style_rec["fp32_nodes"]))
    if _pipeline_passes(per, target_psnr):
        style_rec["pipeline_probes"] = 1
        return per
    units = fp32_units(style.data, style.op_names)
    names = list(units)
    start = len(style_rec["fp32_units"])
    flat = lambda k: [n for u in names[:k] for n in units[u]]  # noqa: E731
    probes = 1
    if start < len(names):
        def measure(k: int):
            compiled = style.bf16(flat(k))
            m = pipe.measure(compiled)
            log.info("pipeline: first %d style unit(s) FP32 -> PSNR %.1f dB", k,
                     min(_worst(x) for x in m.values()))
            return {f"{b}/{o}": v for b, mm in m.items() for o, v in mm.items()}, (compiled, m)

        k, _, (compiled, per), n = _shortest_prefix(start, len(names), measure, target_psnr)
        probes += n
        if _pipeline_passes(per, target_psnr):
            style_rec.update(fp32_units=names[:k], fp32_nodes=flat(k), pins_held=pins_held(compiled, flat(k)),
                             pipeline_probes=probes)
            return per
    fp32 = style.core.compile_model(style.core.read_model(style.data), "CPU", style.cfg32)
    per = pipe.measure(fp32)
    probes += 1
    log.info("pipeline: pins do not reach %.1f dB; the style graph runs FP32 -> PSNR %.1f dB", target_psnr,
             min(_worst(x) for x in per.values()))
    style_rec.update(graph_precision="fp32", fp32_units=[], fp32_nodes=[], pins_held={"f32": 0, "bf16": 0},
                     pipeline_probes=probes)
    return per


def gate_artifacts(task_dir, *, data: str | None = None, samples: int = 8, seed: int = 0,
                   target_psnr: float = DEFAULT_TARGET_PSNR, threads: int | None = None,
                   progress: Callable[[int], None] | None = None,
                   stage: Callable[[str], None] | None = None) -> tuple[dict, Report]:
    """Gate every graph of an exported fp32 portable task directory for OpenVINO BF16 and
    return (record, report). The caller stores the record (`write_gate`)."""
    from calib.data import graph_feeds, load_samples
    from runtime.backends import openvino as ovb
    from runtime.manifest import Manifest

    say = stage or (lambda s: log.info("%s", s))
    d = Path(task_dir)
    man = Manifest.load(d)
    if man.precision != "fp32" or man.flavor != "portable":
        raise SgexError(f"{d}: the BF16 gate needs an fp32 portable export, this one is {man.precision}/{man.flavor}")
    man.verify(d)
    sides = [b.side for b in man.buckets()]
    if not sides:
        raise SgexError(f"{d}: the manifest has no bucket graph")
    sets = {side: load_samples(man.task, side, data, samples, seed) for side in sides}  # bad data fails first
    ov = ovb.import_openvino()
    core = ov.Core()
    ok, why = ovb.bf16_support(core)
    if not ok:
        raise SgexError(f"the BF16 gate needs a CPU with native BF16: {why}")
    threads = ovb.default_threads() if threads is None else threads
    version = ov.__version__.split("-")[0]
    cpu = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    editing_w = np.load(d / "editing_w.npy", allow_pickle=False) if "editing_w.npy" in man.files else None
    report = Report(f"{man.task}: OpenVINO BF16 vs OpenVINO FP32 (CPU)",
                    meta={"artifacts": str(d), "samples": samples, "seed": seed, "data": data or "synthetic",
                          "target PSNR dB": target_psnr, "openvino": version, "cpu": cpu, "threads": threads})
    graphs: dict[str, dict] = {}
    bucket_graph = man.bucket_graph_name()
    style = None
    buckets = []  # (synth graph, its BF16 compiled, feeds(i, wplus), style feeds) for the pipeline
    for side in sides:
        sample_list = sets[side]
        wplus_ref = [None] * len(sample_list)
        x2 = [{"x2": s.x2} for s in sample_list] if "style" in man.graphs else []
        if "style" in man.graphs:
            if style is None:  # the style graph is gated once, on the first bucket's samples
                say("gating style")
                style = _Graph(core, "style", man.read_verified(d, "style"), x2, threads, progress)
                graphs["style"] = gate_graph(style, target_psnr)
                report.add(None, "style", graphs["style"]["_metrics"])
                style32 = core.compile_model(core.read_model(style.data), "CPU", style.cfg32)
            wplus_ref = [style._run(style32, f)["wplus"] for f in x2]
        key = f"{bucket_graph}@{side}"
        names = [i["name"] for i in man.graph(key)["inputs"]]

        def feeds(i, wplus, names=names, sample_list=sample_list):
            return graph_feeds(names, sample_list[i], style_dim=man.style_dim, wplus=wplus,
                               editing_w=editing_w, index=i)

        say(f"gating {key}")
        g = _Graph(core, key, man.read_verified(d, key), [feeds(i, w) for i, w in enumerate(wplus_ref)],
                   threads, progress)
        rec = gate_graph(g, target_psnr)
        graphs[key] = rec
        report.add(side, key, rec["_metrics"])
        buckets.append((g, g.bf16(rec["fp32_nodes"]), feeds, x2))
    pipeline: dict[str, dict] = {}
    if style is not None and all(r["passed"] for r in graphs.values()):
        say("gating the pipeline (BF16 style code into BF16 synth)")
        per = gate_pipeline(_Pipeline(style, buckets), graphs["style"], target_psnr)
        for g, *_ in buckets:
            side = g.key.split("@")[1]
            where = "style FP32" if graphs["style"]["graph_precision"] == "fp32" else "style BF16"
            report.add(int(side), f"pipeline@{side} ({where})", per[g.key])
            pipeline[g.key] = {"passed": _passes(per[g.key], target_psnr), "psnr": _json_float(_worst(per[g.key])),
                               "outputs": {n: m.to_json() for n, m in per[g.key].items()}}
    for key, rec in graphs.items():
        rec.pop("_metrics")
        rec["sha256"] = man.graph(key)["sha256"]
    passed = all(r["passed"] for r in graphs.values()) and all(p["passed"] for p in pipeline.values())
    for key, rec in sorted(graphs.items()):
        report.meta[f"{key} FP32 units"] = ("whole graph (FP32 compile)" if rec["graph_precision"] == "fp32"
                                            else ", ".join(rec["fp32_units"]) or "none")
    report.meta["gate"] = "PASSED" if passed else "FAILED"
    record = {"format": GATE_FORMAT, "version": GATE_VERSION, "passed": passed, "target_psnr": target_psnr,
              "openvino": version, "cpu": cpu, "samples": samples, "seed": seed, "data": data or "synthetic",
              "graphs": graphs, "pipeline": pipeline}
    return record, report


def write_gate(task_dir, record: dict) -> Path:
    """Store the record in the task directory's manifest (atomically; other fields unchanged)."""
    from runtime.manifest import BF16_GATE, Manifest

    man = Manifest.load(task_dir)
    man.data[BF16_GATE] = record
    return man.save(task_dir)

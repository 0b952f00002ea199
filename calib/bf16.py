"""The BF16 accuracy gate of the OpenVINO backend: BF16 against FP32, per output, per graph, per
bucket, with FP32 islands where a graph misses the target.

Both sides run on OpenVINO's CPU plugin from the same verified bytes (runtime/backends/openvino.py):
the reference with inference precision f32, the candidate with bf16, so the measured difference is
BF16 and nothing else. Inputs are the calibration set of calib.data (a folder, a video or seeded
synthetic inputs); synth graphs get the FP32 style graph's w+ of each sample (every graph is
gated on FP32 inputs, as the FP16 plan is), and a "pipeline" row (the BF16 style code into the
BF16 synth graph) is reported beside them.

Metrics per output (calib.compare.OutputMetrics): worst-sample PSNR with the reference's range as
peak, max |diff|, NaN/Inf counts. A graph passes when every output is finite and its worst PSNR
reaches `target_psnr`. When it does not, units -- layer scopes of the ONNX graph
(calib.ranges.layer_scope: "decoder.convs.3", "encoder.body.7"), or single nodes outside any
layer -- are moved to FP32 in graph order, shortest prefix that passes, found by doubling and
bisection (each probe is a compile and a run of the calibration set). Graph order because error
injected early is amplified by every layer after it; the ranking is a heuristic, the pass is
measured. FP32 is kept per node with OpenVINO's "precise" runtime attribute
(runtime.backends.openvino.pin_fp32).

The record (JSON, stored in the manifest under runtime.manifest.BF16_GATE):

    {"format": "sgex-bf16-gate", "version": 1, "passed": bool, "target_psnr": 40.0,
     "openvino": "2026.4.1", "cpu": "...", "samples": 8, "seed": 0, "data": "synthetic",
     "graphs": {"synth@128": {"sha256": <graph sha256>, "passed": bool, "psnr": worst dB,
                              "fp32_units": [...], "fp32_nodes": [...], "probes": n,
                              "outputs": {"y": {psnr, max_abs_diff, nan, inf, ...}}}, ...}}
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import numpy as np

from calib.compare import OutputMetrics, Report, _json_float
from runtime.errors import SgexError

log = logging.getLogger(__name__)

GATE_FORMAT = "sgex-bf16-gate"
GATE_VERSION = 1
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


def gate_graph(g: _Graph, target_psnr: float) -> dict:
    """Measure BF16 with no pins; when it misses the target, the shortest graph-order prefix of
    units in FP32 that passes (doubling then bisection). Returns the graph's record (no sha256)."""
    metrics = g.measure([])
    probes = 1
    chosen: list[str] = []
    if not _passes(metrics, target_psnr):
        units = fp32_units(g.data, g.op_names)
        names = list(units)
        cache: dict[int, dict] = {}

        def probe(k: int) -> dict:
            if k not in cache:
                cache[k] = (g.measure([n for u in names[:k] for n in units[u]]), g.last)
                log.info("%s: first %d unit(s) FP32 -> PSNR %.1f dB", g.key, k, _worst(cache[k][0]))
            return cache[k][0]

        lo, hi, k = 0, None, 1
        while k <= len(names):
            if _passes(probe(k), target_psnr):
                hi = k
                break
            lo, k = k, (min(2 * k, len(names)) if k < len(names) else len(names) + 1)
        if hi is None:
            hi = len(names)
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _passes(probe(mid), target_psnr):
                    hi = mid
                else:
                    lo = mid
        if names:
            metrics = probe(hi)
            g.last = cache[hi][1]
        probes += len(cache)
        chosen = names[:hi]
        nodes = [n for u in chosen for n in units[u]]
    else:
        nodes = []
    return {"passed": _passes(metrics, target_psnr), "psnr": _json_float(_worst(metrics)),
            "fp32_units": chosen, "fp32_nodes": nodes, "probes": probes,
            "pins_held": pins_held(g.last, nodes),
            "outputs": {n: m.to_json() for n, m in metrics.items()}, "_metrics": metrics}


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
    style32 = style16 = None
    for side in sides:
        sample_list = sets[side]
        wplus_ref = wplus_bf16 = [None] * len(sample_list)
        if "style" in man.graphs:
            x2 = [{"x2": s.x2} for s in sample_list]
            if style32 is None:  # the style graph is gated once, on the first bucket's samples
                say("gating style")
                style = _Graph(core, "style", man.read_verified(d, "style"), x2, threads, progress)
                graphs["style"] = gate_graph(style, target_psnr)
                report.add(None, "style", graphs["style"]["_metrics"])
                style32 = core.compile_model(core.read_model(style.data), "CPU", style.cfg32)
                style16 = style.bf16(graphs["style"]["fp32_nodes"])
            wplus_ref = [style._run(style32, f)["wplus"] for f in x2]
            wplus_bf16 = [style._run(style16, f)["wplus"] for f in x2]
        key = f"{bucket_graph}@{side}"
        data_bytes = man.read_verified(d, key)
        names = [i["name"] for i in man.graph(key)["inputs"]]
        feeds = [graph_feeds(names, s, style_dim=man.style_dim, wplus=wplus_ref[i], editing_w=editing_w, index=i)
                 for i, s in enumerate(sample_list)]
        say(f"gating {key}")
        g = _Graph(core, key, data_bytes, feeds, threads, progress)
        rec = gate_graph(g, target_psnr)
        graphs[key] = rec
        report.add(side, key, rec["_metrics"])
        if "style" in man.graphs:
            cand = g.bf16(rec["fp32_nodes"])
            pipe = {n: OutputMetrics(n) for n in g.outputs}
            for i, s in enumerate(sample_list):
                f = graph_feeds(names, s, style_dim=man.style_dim, wplus=wplus_bf16[i], editing_w=editing_w, index=i)
                c = g._run(cand, f)
                for n in g.outputs:
                    pipe[n].add(g.ref[i][n], c[n])
            report.add(side, f"pipeline@{side} (reported, not gated)", pipe)
    for key, rec in graphs.items():
        rec.pop("_metrics")
        rec["sha256"] = man.graph(key)["sha256"]
    passed = all(r["passed"] for r in graphs.values())
    for key, rec in sorted(graphs.items()):
        report.meta[f"{key} FP32 units"] = ", ".join(rec["fp32_units"]) or "none"
    report.meta["gate"] = "PASSED" if passed else "FAILED"
    record = {"format": GATE_FORMAT, "version": GATE_VERSION, "passed": passed, "target_psnr": target_psnr,
              "openvino": version, "cpu": cpu, "samples": samples, "seed": seed, "data": data or "synthetic",
              "graphs": graphs}
    return record, report


def write_gate(task_dir, record: dict) -> Path:
    """Store the record in the task directory's manifest (atomically; other fields unchanged)."""
    from runtime.manifest import BF16_GATE, Manifest

    man = Manifest.load(task_dir)
    man.data[BF16_GATE] = record
    return man.save(task_dir)

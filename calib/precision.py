"""Measured FP16 precision plans: which nodes of a graph stay FP32.

Input: the FP32 ONNX graph of each task graph (style, synth or translate, exported by the dynamo
exporter so nodes carry their reference module path) and its calibration feeds (calib.data).
Output: a plan in the CONTRACTS format, consumed by export.fp16.convert_to_fp16:

    {"format": "sgex-precision-plan", "version": 1, "task": T, "source": "calibrated",
     "rules": {"io_fp32": true, "vectors_fp32": true},
     "graphs": {G: {"fp32_scopes": [...], "fp32_nodes": [...]}}, "notes": "..."}

Search, per graph (deterministic: no randomness, every ranking tie broken by name):

1. Rules. Graph I/O and the demodulation chain stay FP32 (rules.io_fp32, rules.vectors_fp32:
   every node without spatial extent: mapping, modulation styles, demodulation sums/rsqrt, w+
   arithmetic, attention MLPs, normalisation statistics). They cost nothing and are where
   StyleGAN2 overflows FP16 (a sum of squared styles times squared weights).
2. Overflow. Activation ranges are measured on the FP32 graph (calib.ranges). A tensor whose
   max |x| times `headroom` reaches the FP16 maximum 65504 (or that is NaN/Inf in FP32) must
   never exist in FP16: its producer and every consumer go to fp32_nodes (a consumer in FP16
   would read it through a Cast to FP16, which overflows just the same). A float initializer
   beyond the range pins its consumers likewise. `headroom` (default 4, i.e. two binades) covers
   inputs hotter than the calibration set; use 16 for small or unrepresentative sets.
   These are node names, not scopes, because one overflowing add must not drag a whole layer's
   convolutions into FP32.
3. Error. The FP16 graph under the rules and pins is run on the calibration set with every
   intermediate tensor as an output and compared with the FP32 graph. If the worst-sample PSNR of
   a graph output is below `target_psnr` (or an output is NaN/Inf), candidate units -- a layer
   scope ("decoder.convs.3", "encoder.fusion.0"; calib.ranges.layer_scope), or a single node for
   nodes outside any layer -- are ranked by their measured error contribution (first-order error
   propagation, `GraphCalibrator.contributions`: the FP16 error each unit adds from exact inputs,
   measured once on a shadow graph, times how much the layers after it amplify error, read off
   the measured error of the tensors it emits relative to the outputs' error). The plan then
   moves the shortest prefix of that ranking to FP32 that meets the target, found by doubling
   and bisection (log2 of the units' count measurements, assuming more FP32 never hurts).
   Scopes go to fp32_scopes, so plans name reference layers and survive re-exports.
   Measurements run on ONNX Runtime CPU with FP16 storage emulated (calib.compare.emulate_fp16):
   ONNX Runtime's CPU provider would otherwise compute FP16 regions in FP32 and hide overflow.

The plan states in `notes` the headroom, target, samples, seed, the measured PSNR per graph and
the fraction of convolution FLOPs left in FP32 (`conv_flops`), and carries no timestamp, so the
same checkpoint, data and seed give a byte-identical file.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from calib.compare import OutputMetrics, emulate_fp16
from calib.ranges import (
    FP16_MAX,
    DEFAULT_MAX_BYTES,
    RangeTable,
    SessionFactory,
    collect_ranges,
    default_session,
    layer_scope,
    node_scope,
    run_intermediates,
    tensor_sizes,
)
from export.fp16 import PLAN_FORMAT, PLAN_VERSION  # light module: no torch/onnx at import
from runtime.errors import SgexError

log = logging.getLogger(__name__)

DEFAULT_HEADROOM = 4.0
DEFAULT_TARGET_PSNR = 40.0
CONV_OPS = ("Conv", "ConvTranspose", "FusedModulatedConv2d")

Converter = Callable[[object, dict, dict], object]  # (fp32 ModelProto, graph_plan, rules) -> fp16 ModelProto


def default_converter(model, graph_plan: dict, rules: dict):
    from export.fp16 import convert_to_fp16

    return convert_to_fp16(model, graph_plan, rules)


def naive_plan(task: str, graphs) -> dict:
    """Everything FP16 except graph I/O: no vector rule, no islands (the plan that overflows)."""
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "task": task,
        "source": "naive",
        "rules": {"io_fp32": True, "vectors_fp32": False},
        "graphs": {g: {"fp32_scopes": [], "fp32_nodes": []} for g in graphs},
        "notes": "naive: every node FP16 except graph inputs/outputs",
    }


# ---------------------------------------------------------------------------------------------
# FLOPs by precision
# ---------------------------------------------------------------------------------------------

def _shape_table(model, ranges: RangeTable | None) -> dict[str, list[int]]:
    """tensor name -> shape: initializer dims, then every shape the range pass observed."""
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    if ranges is not None:
        for name, t in ranges.tensors.items():
            if t.shape:
                shapes[name] = list(t.shape)
    return shapes


def conv_flops(model, shapes: dict[str, list[int]]) -> dict[str, int]:
    """{node name: FLOPs (2 x MACs)} of every Conv / ConvTranspose / FusedModulatedConv2d at the
    shapes given (tensor name -> shape, e.g. measured by collect_ranges).

    Conv, FusedModulatedConv2d: 2 * |y| * Cin/groups * kh * kw (weight [Cout, Cin/g, kh, kw]);
    ConvTranspose: 2 * |x| * Cout/groups * kh * kw (weight [Cin, Cout/g, kh, kw])."""
    out = {}
    for n in model.graph.node:
        if n.op_type not in CONV_OPS:
            continue
        w = shapes.get(n.input[1])
        if n.op_type == "ConvTranspose":
            x = shapes.get(n.input[0])
            if x is None or w is None:
                raise ValueError(f"no shape for the input/weight of {n.name}")
            out[n.name] = 2 * int(np.prod(x)) * int(np.prod(w[1:]))
        else:
            y = shapes.get(n.output[0])
            if y is None or w is None:
                raise ValueError(f"no shape for the output/weight of {n.name}")
            out[n.name] = 2 * int(np.prod(y)) * int(np.prod(w[1:]))
    return out


def conv_precisions(fp16_model) -> dict[str, str]:
    """{node name: "fp16" | "fp32"} for the conv nodes of a converted graph, from the value types
    of the node's data input and weight (export.fp16.node_compute_dtypes)."""
    import onnx

    from export.fp16 import node_compute_dtypes

    dtypes = node_compute_dtypes(fp16_model)
    res = {}
    for n in fp16_model.graph.node:
        if n.op_type in CONV_OPS:
            res[n.name] = "fp16" if onnx.TensorProto.FLOAT16 in dtypes.get(n.name, set()) else "fp32"
    return res


def flops_by_precision(fp32_model, fp16_model, shapes: dict[str, list[int]]) -> dict:
    """{"fp16": FLOPs, "fp32": FLOPs, "fp32_fraction": float, "shape": ...} of conv nodes."""
    flops = conv_flops(fp32_model, shapes)
    prec = conv_precisions(fp16_model)
    missing = sorted(set(flops) - set(prec))
    if missing:
        raise ValueError(f"converted graph lost conv nodes {missing[:3]}")
    tot = {"fp16": 0, "fp32": 0}
    for name, f in flops.items():
        tot[prec[name]] += f
    total = tot["fp16"] + tot["fp32"]
    return {**tot, "fp32_fraction": (tot["fp32"] / total) if total else 0.0}


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------

def _rel_err(ref: np.ndarray, cand: np.ndarray) -> float:
    cand = np.asarray(cand).astype(np.float32)
    if not np.isfinite(cand).all():
        return math.inf
    ref = np.asarray(ref, np.float32)
    d = float(np.sqrt(np.mean((cand.astype(np.float64) - ref) ** 2)))
    r = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
    return d / (r + 1e-12)


@dataclass
class Measurement:
    """FP16-vs-FP32 error of one plan on one graph."""

    outputs: dict[str, OutputMetrics]
    tensor_err: dict[str, float] = field(default_factory=dict)  # max over samples of relative RMS error

    @property
    def psnr(self) -> float:
        return min((m.psnr for m in self.outputs.values()), default=math.inf)

    @property
    def finite(self) -> bool:
        return all(m.finite for m in self.outputs.values())


class GraphCalibrator:
    """The FP32 graph, its feeds and its measured ranges; measures candidate plans against it."""

    def __init__(
        self,
        name: str,
        model,
        feeds_list: list[dict[str, np.ndarray]],
        *,
        converter: Converter = default_converter,
        session: SessionFactory = default_session,
        max_bytes: int = DEFAULT_MAX_BYTES,
        progress: Callable[[int], None] | None = None,
    ):
        if not feeds_list:
            raise SgexError(f"{name}: the calibration set is empty")
        self.name = name
        self.model = model
        self.feeds = feeds_list
        self.converter = converter
        self.session = session
        self.max_bytes = max_bytes
        self.progress = progress
        self.out_names = [o.name for o in model.graph.output]
        self.sizes = tensor_sizes(model, feeds_list[0])
        self.names = list(self.sizes)
        # keep the FP32 intermediates when they fit the memory bound: one reference run in all
        keep = sum(self.sizes.values()) * len(feeds_list) <= max_bytes
        self._ref_cache: list[dict[str, np.ndarray]] | None = [{} for _ in feeds_list] if keep else None

        def on_values(i, res):
            if self._ref_cache is not None:
                self._ref_cache[i].update(res)

        self.ranges = collect_ranges(model, feeds_list, max_bytes=max_bytes, session=session, progress=progress,
                                     sizes=self.sizes, on_values=on_values)
        self.shapes = _shape_table(model, self.ranges)
        self._local: dict[str, float] | None = None

    def convert(self, graph_plan: dict, rules: dict):
        return self.converter(self.model, graph_plan, rules)

    def measure(self, fp16_model, intermediates: bool = True) -> Measurement:
        """Outputs' metrics (worst-sample PSNR etc.) and every intermediate's relative error of
        a converted graph, run with FP16 storage emulated (calib.compare.emulate_fp16)."""
        fp16_model = emulate_fp16(fp16_model)
        names = [n for n in self.names if n not in set(self.out_names)] if intermediates else []
        names += self.out_names
        have = {o for n in fp16_model.graph.node for o in n.output}
        names = [n for n in names if n in have]
        outputs = {o: OutputMetrics(o) for o in self.out_names}
        err: dict[str, float] = {}
        cand_iter = run_intermediates(fp16_model, self.feeds, names, max_bytes=self.max_bytes, session=self.session,
                                      sizes=self.sizes)
        for chunk, cand in cand_iter:
            if self._ref_cache is not None:
                ref = [{n: r[n] for n in chunk if n in r} for r in self._ref_cache]
            else:
                ref = next(iter(run_intermediates(self.model, self.feeds, chunk, max_bytes=1 << 62,
                                                  session=self.session, sizes=self.sizes)))[1]
            for r, c in zip(ref, cand):
                for n, v in c.items():
                    if n not in r:
                        continue
                    err[n] = max(err.get(n, 0.0), _rel_err(r[n], v))
                    if n in outputs:
                        outputs[n].add(r[n], v)
            if self.progress:
                self.progress(len(self.feeds))
        return Measurement(outputs, err)

    # -- plan pieces ------------------------------------------------------------------------------
    def overflow_nodes(self, headroom: float) -> tuple[list[str], list[str]]:
        """(node names that must stay FP32, tensor names that forced them), in graph order."""
        g = self.model.graph
        consumers: dict[str, list[str]] = {}
        producer: dict[str, str] = {}
        for n in g.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n.name)
            for o in n.output:
                producer[o] = n.name
        risky = sorted(
            (t for t in self.ranges.tensors.values() if t.overflows(headroom)),
            key=lambda t: t.name,
        )
        pinned: set[str] = set()
        for t in risky:
            if t.name in producer:
                pinned.add(producer[t.name])
            pinned.update(consumers.get(t.name, []))
        order = [n.name for n in g.node if n.name in pinned]
        return order, [t.name for t in risky]

    def units(self) -> dict[str, list]:
        """Candidate units of the greedy search: layer scope -> nodes, or "node:<name>" -> [node]
        for nodes outside any layer and for nodes that sit directly in a container module (a
        scope that is a prefix of other units: marking it would take the whole container)."""
        nodes = list(self.model.graph.node)
        layer = {n.name: layer_scope(node_scope(n)) for n in nodes}
        scopes = {s for s in layer.values() if s}
        containers = {s for s in scopes if any(t.startswith(s + ".") for t in scopes)}
        out: dict[str, list] = {}
        for n in nodes:
            s = layer[n.name]
            key = s if s and s not in containers else f"node:{n.name}"
            out.setdefault(key, []).append(n)
        return out

    def local_errors(self) -> dict[str, float]:
        """{node name: relative RMS error of the node computed with FP16 storage from the exact
        FP32 inputs} (max over outputs and samples; inf when it overflows).

        One run of a shadow graph: next to every float node of the FP32 graph sits a copy that
        reads the FP32 tensors rounded to FP16 and whose outputs are rounded to FP16 (the
        emulate_fp16 semantics). Its error is what the node itself adds in FP16 -- rounding,
        cancellation, underflow -- independent of the plan and of the error it inherits."""
        if self._local is not None:
            return self._local
        import onnx
        from onnx import TensorProto, helper

        F, H = TensorProto.FLOAT, TensorProto.FLOAT16
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        g = m.graph
        floats = set(self.sizes) | {i.name for i in g.input} | {
            i.name for i in g.initializer if i.data_type == F}
        rounded: dict[str, str] = {}
        extra, shadow_of = [], {}

        def r16(x):
            if x not in rounded:
                rounded[x] = f"{x}__r16"
                extra.append(helper.make_node("Cast", [x], [f"{x}__h16"], to=H, name=f"{x}__shadow_h"))
                extra.append(helper.make_node("Cast", [f"{x}__h16"], [rounded[x]], to=F, name=f"{x}__shadow_f"))
            return rounded[x]

        for n in g.node:
            outs = [o for o in n.output if o in self.sizes]
            if not outs or n.op_type in ("Constant", "Cast"):
                continue
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = f"{n.name}__shadow"
            for i, x in enumerate(c.input):
                if x in floats:
                    c.input[i] = r16(x)
            tail = []
            for i, o in enumerate(c.output):
                if not o:
                    continue
                c.output[i] = f"{o}__s32"
                if o in self.sizes:
                    tail.append(helper.make_node("Cast", [c.output[i]], [f"{o}__s16"], to=H, name=f"{o}__shadow_o16"))
                    tail.append(helper.make_node("Cast", [f"{o}__s16"], [f"{o}__shadow"], to=F, name=f"{o}__shadow_o32"))
                    shadow_of[f"{o}__shadow"] = (n.name, o)
            extra.append(c)
            extra.extend(tail)
        # shadow nodes read only FP32 tensors of the original graph: appending keeps topological order
        g.node.extend(extra)
        names = list(shadow_of)
        sizes = {k: self.sizes[o] for k, (_, o) in shadow_of.items()}
        local: dict[str, float] = {}
        for _chunk, results in run_intermediates(m, self.feeds, names, max_bytes=self.max_bytes,
                                                 session=self.session, sizes=sizes):
            for i, res in enumerate(results):
                ref = self._ref_cache[i] if self._ref_cache is not None else None
                if ref is None:
                    ref = next(iter(run_intermediates(self.model, [self.feeds[i]], [shadow_of[k][1] for k in res],
                                                      max_bytes=1 << 62, session=self.session, sizes=self.sizes)))[1][0]
                for k, v in res.items():
                    node, o = shadow_of[k]
                    local[node] = max(local.get(node, 0.0), _rel_err(ref[o], v))
        self._local = local
        return local

    def contributions(self, fp16_model, m: Measurement, units: dict[str, list], done: set[str]) -> list[tuple[float, str]]:
        """[(estimated output error, unit)] for units not yet FP32 that still compute in FP16 in
        fp16_model, sorted by the estimate (desc) then name.

        First-order error propagation: the unit injects its local FP16 error l_u (local_errors:
        the largest over its FP16 nodes), which downstream layers amplify the way they amplified
        the error already present at the unit's outputs, so its share of the output error is
        about l_u * E / e_u, with e_u the measured relative error of the tensors leaving the
        unit and E that of the graph outputs (Measurement.tensor_err of the current plan).
        Units whose error reaches the outputs amplified (early layers) rank first, which a bare
        local error cannot see: in FP16 most ops add about the same rounding error."""
        import onnx

        from export.fp16 import node_compute_dtypes

        local = self.local_errors()
        dtypes = node_compute_dtypes(fp16_model)
        big = max((m.tensor_err.get(o, 0.0) for o in self.out_names), default=0.0)
        res = []
        for u, nodes in units.items():
            if u in done:
                continue
            errs = [local[n.name] for n in nodes if n.name in local and onnx.TensorProto.FLOAT16 in dtypes.get(n.name, ())]
            if not errs or max(errs) <= 0:
                continue
            l_u = max(errs)
            produced = {o for n in nodes for o in n.output if o}
            e_u = max((m.tensor_err.get(o, 0.0) for o in produced), default=0.0)
            if math.isfinite(big) and math.isfinite(e_u):
                c = l_u * big / max(e_u, l_u)
            else:  # non-finite somewhere: rank by the local error alone
                c = l_u
            res.append((c, u))
        res.sort(key=lambda cu: (-cu[0], cu[1]))
        return res


def _met(m: Measurement, target_psnr: float) -> bool:
    return m.finite and m.psnr >= target_psnr


def plan_graph(
    cal: GraphCalibrator,
    *,
    headroom: float = DEFAULT_HEADROOM,
    target_psnr: float = DEFAULT_TARGET_PSNR,
    max_steps: int = 256,
) -> tuple[dict, dict]:
    """(graph_plan, info) for one graph; see the module docstring for the search.

    max_steps: how many ranked units the search may move at most.
    info: {"psnr", "finite", "steps" (plans measured), "overflow_tensors", "greedy": [{unit,
    contribution}] (the units moved, in rank order),
    "flops": flops_by_precision(...), "met": bool, "outputs": {name: OutputMetrics} of the final plan}."""
    rules = {"io_fp32": True, "vectors_fp32": True}
    forced, risky = cal.overflow_nodes(headroom)
    base = {"fp32_scopes": [], "fp32_nodes": list(forced)}
    fp16 = cal.convert(base, rules)
    m = cal.measure(fp16)
    plan = base
    greedy: list[dict] = []
    steps = 0
    if not _met(m, target_psnr):
        ranked = cal.contributions(fp16, m, cal.units(), set())[:max_steps]
        probes: dict[int, tuple] = {}

        def probe(k):
            if k not in probes:
                p = {"fp32_scopes": list(base["fp32_scopes"]), "fp32_nodes": list(base["fp32_nodes"])}
                for _c, u in ranked[:k]:
                    (p["fp32_nodes"] if u.startswith("node:") else p["fp32_scopes"]).append(u.split("node:", 1)[-1])
                f = cal.convert(p, rules)
                mm = cal.measure(f, intermediates=False)
                probes[k] = (p, f, mm)
                log.info("%s: top %d unit(s) FP32 -> PSNR %.1f dB", cal.name, k, mm.psnr)
            return probes[k]

        # shortest prefix of the ranking that meets the target: doubling, then bisection
        lo, hi = 0, None
        k = 1
        while k <= len(ranked):
            if _met(probe(k)[2], target_psnr):
                hi = k
                break
            lo = k
            k = min(2 * k, len(ranked)) if k < len(ranked) else len(ranked) + 1
        if hi is None:
            hi = len(ranked)
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _met(probe(mid)[2], target_psnr):
                    hi = mid
                else:
                    lo = mid
        if ranked:
            plan, fp16, m = probe(hi)
        steps = len(probes)
        greedy = [{"unit": u, "contribution": _round(c)} for c, u in ranked[:hi]]
    order = {n.name: i for i, n in enumerate(cal.model.graph.node)}
    plan["fp32_nodes"] = sorted(set(plan["fp32_nodes"]), key=lambda n: order.get(n, len(order)))
    plan["fp32_scopes"] = sorted(set(plan["fp32_scopes"]))
    info = {
        "psnr": m.psnr,
        "finite": m.finite,
        "met": _met(m, target_psnr),
        "steps": steps,
        "overflow_tensors": risky,
        "pinned": forced,
        "greedy": greedy,
        "flops": flops_by_precision(cal.model, fp16, cal.shapes),
        "outputs": m.outputs,
    }
    return plan, info


def _round(v: float):
    return round(v, 3) if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def make_plan(
    task: str,
    calibrators: dict[str, GraphCalibrator],
    *,
    headroom: float = DEFAULT_HEADROOM,
    target_psnr: float = DEFAULT_TARGET_PSNR,
    samples: int | None = None,
    seed: int | None = None,
    data: str | None = None,
) -> tuple[dict, dict[str, dict]]:
    """(plan, infos) for every graph of a task (graph name -> GraphCalibrator). The plan is
    JSON-ready and deterministic (no timestamp); infos hold the measurements per graph."""
    if headroom < 1:
        raise SgexError(f"--headroom must be >= 1, got {headroom}")
    graphs, infos = {}, {}
    for name in sorted(calibrators):
        graphs[name], infos[name] = plan_graph(calibrators[name], headroom=headroom, target_psnr=target_psnr)
    parts = []
    for name in sorted(infos):
        i = infos[name]
        parts.append(
            f"{name}: PSNR {_fmt(i['psnr'])} dB vs FP32 (worst sample), conv FLOPs in FP32 "
            f"{100 * i['flops']['fp32_fraction']:.1f}%, {len(i['overflow_tensors'])} tensor(s) beyond "
            f"65504/{headroom:g} pinned {len(i['pinned'])} node(s), the error search moved "
            f"{len(i['greedy'])} layer(s)/node(s) to FP32"
            + ("" if i["met"] else "; TARGET NOT MET")
        )
    notes = (
        f"calibrated on {samples if samples is not None else '?'} sample(s) ({data or 'synthetic'}, seed "
        f"{seed if seed is not None else '?'}) on ONNX Runtime CPU with FP16 storage emulated; headroom {headroom:g}x (FP16 max "
        f"{FP16_MAX:g}), target PSNR {target_psnr:g} dB; vectors (demodulation chain) FP32. " + "; ".join(parts)
    )
    plan = {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "task": task,
        "source": "calibrated",
        "rules": {"io_fp32": True, "vectors_fp32": True},
        "graphs": graphs,
        "notes": notes,
    }
    return plan, infos


def _fmt(v: float) -> str:
    return f"{v:.1f}" if math.isfinite(v) else str(v)


def plan_json(plan: dict) -> str:
    """The plan as written to disk: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(plan, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------
# one call: checkpoint -> FP32 export -> calibration set -> plan + report
# ---------------------------------------------------------------------------------------------

@dataclass
class CalibrationResult:
    plan: dict
    infos: dict[str, dict]
    report: object  # calib.compare.Report: FP32 vs FP16 under the plan (and the naive FP16 graph)


def calibrate_task(
    task: str,
    res: int,
    *,
    ckpt: str | None = None,
    random_weights: bool = False,
    data: str | None = None,
    samples: int = 8,
    seed: int = 0,
    target_psnr: float = DEFAULT_TARGET_PSNR,
    headroom: float = DEFAULT_HEADROOM,
    width_div: int = 1,
    max_bytes: int = DEFAULT_MAX_BYTES,
    naive: bool = True,
    artifacts: str | None = None,
    progress: Callable[[int], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> CalibrationResult:
    """Export the FP32 graphs of `task` at bucket `res` (portable flavor) into a temporary
    directory -- or use an existing FP32 export, `artifacts` = its task directory -- build the
    calibration set (calib.data), and return the plan, the per-graph measurements and an
    accuracy report. RGB tasks calibrate the synth graph on the FP32 style graph's w+ for each
    sample's x2 (each graph is planned on FP32 inputs).

    naive: also measure the naive FP16 graphs (rules off, no islands) for the report."""
    import contextlib
    import tempfile

    from calib.compare import Report, compare_graphs
    from calib.data import graph_feeds, load_samples
    from calib.ranges import load_model
    from export.onnx import export_task
    from runtime.buckets import check_side
    from runtime.manifest import Manifest
    from runtime.tasks import get_task

    t = get_task(task)
    try:
        check_side(res)
    except ValueError as e:
        raise SgexError(str(e)) from None
    if headroom < 1:
        raise SgexError(f"--headroom must be >= 1, got {headroom}")
    say = stage or (lambda s: log.info("%s", s))
    sample_list = load_samples(task, res, data, samples, seed)  # bad data fails before the export
    if artifacts is not None and (ckpt or random_weights):
        raise SgexError("give either an FP32 export (--artifacts) or a checkpoint / --random-weights, not both")
    with contextlib.ExitStack() as stack:
        if artifacts is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sgex-calib-"))
            say(f"exporting the FP32 {'/'.join(t.graphs)} graph(s) at {res}")
            export_task(task, res, ckpt=ckpt, random_weights=random_weights, out=tmp, precision="fp32",
                        seed=seed, width_div=width_div, progress=False)
            tdir = f"{tmp}/{task}"
        else:
            tdir = str(artifacts)
        man = Manifest.load(tdir, task=task)
        if man.precision != "fp32" or man.flavor != "portable":
            raise SgexError(f"{tdir}: calibration needs an fp32 portable export, this one is {man.precision}/{man.flavor}")
        man.verify(tdir)
        style_dim = man.style_dim
        editing_w = np.load(f"{tdir}/editing_w.npy") if "editing_w.npy" in man.files else None
        bucket_graph = man.bucket_graph_name()
        models = {bucket_graph: load_model(str(man.path(tdir, f"{bucket_graph}@{res}")))}
        feeds: dict[str, list] = {}
        wplus = [None] * len(sample_list)
        if "style" in man.graphs:
            models["style"] = load_model(str(man.path(tdir, "style")))
            feeds["style"] = [{"x2": s.x2} for s in sample_list]
            sess = default_session(models["style"])
            wplus = [sess.run(["wplus"], f)[0] for f in feeds["style"]]
            del sess
        names = [i.name for i in models[bucket_graph].graph.input]
        feeds[bucket_graph] = [graph_feeds(names, s, style_dim=style_dim, wplus=wplus[i], editing_w=editing_w, index=i)
                               for i, s in enumerate(sample_list)]
        cals = {}
        for g in sorted(models):
            say(f"measuring activation ranges of {g} ({len(sample_list)} samples)")
            cals[g] = GraphCalibrator(g, models[g], feeds[g], max_bytes=max_bytes, progress=progress)
        say("searching the precision plan")
        plan, infos = make_plan(task, cals, headroom=headroom, target_psnr=target_psnr,
                                samples=len(sample_list), seed=seed, data=data)
        say("writing the accuracy report")
        report = Report(
            f"{task} @ {res}: FP16 (FP32 compute, FP16 storage emulated on ONNX Runtime CPU) vs FP32",
            meta={"samples": len(sample_list), "seed": seed, "data": data or "synthetic",
                  "headroom": headroom, "target PSNR dB": target_psnr,
                  **{f"{g} conv FLOPs in FP32": f"{100 * infos[g]['flops']['fp32_fraction']:.2f}%"
                     for g in sorted(infos)}},
        )
        nv = naive_plan(task, models)
        for g in sorted(models):
            key = g if g == "style" else f"{g}@{res}"
            bucket = None if g == "style" else res
            report.add(bucket, f"{key} calibrated", infos[g]["outputs"])  # measured by the search itself
            if naive:
                fp16n = convert_plan_graph(models[g], nv, g)
                report.add(bucket, f"{key} naive fp16", compare_graphs(models[g], fp16n, feeds[g]))
    return CalibrationResult(plan, infos, report)


def convert_plan_graph(model, plan: dict, graph: str, converter: Converter = default_converter):
    """The FP16 graph of `graph` under `plan` (plan["graphs"][graph] with plan["rules"])."""
    return converter(model, plan["graphs"].get(graph, {"fp32_scopes": [], "fp32_nodes": []}), plan["rules"])

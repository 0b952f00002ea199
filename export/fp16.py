"""FP16 ONNX graphs with FP32 islands, driven by a precision plan.

TensorRT 11 builds strongly typed networks only, so an FP16 engine needs the precision written into
the ONNX graph. `convert_to_fp16` turns an FP32 graph into one where every node computes in FP16
except the nodes a precision plan keeps in FP32, with Casts at every FP16/FP32 boundary.

Precision plan (JSON; `default_plan(task)` writes the default, `sgex-calib` a calibrated one):

    {"format": "sgex-precision-plan", "version": 1, "task": "superres", "source": "default",
     "rules": {"io_fp32": true, "vectors_fp32": true},
     "graphs": {"synth": {"fp32_scopes": ["decoder.conv1"], "fp32_nodes": ["node_conv2d_3"]},
                "style": {"fp32_scopes": [], "fp32_nodes": []}},
     "notes": "..."}

A node stays FP32 when any of these holds (`fp32_reasons` says which):
  * "name"    its node name is in fp32_nodes;
  * "scope"   its module path matches an fp32_scopes entry (the entry or a dotted child of it);
  * "vector"  (rules.vectors_fp32) every float output has no spatial extent: rank <= 3, or rank 4
              with static spatial dims of 1 ([B, C, 1, 1]). That is the mapping network, the
              modulation styles, the demodulation sums/rsqrt, w+ arithmetic, attention MLPs and
              per-sample normalisation statistics: cheap, and where FP16 overflows;
  * "const"   every input is a constant (weight preprocessing such as scale, flip, square-sum):
              builders fold these, so computing them in FP32 costs nothing at run time;
  * "unknown" shape inference gave no rank for a float output (conservative);
  * "custom"  an op of another domain that has no FP16 typing rule below.
Graph inputs and outputs stay FP32 (rules.io_fp32; the runtime feeds and reads float32).

Where the dynamo exporter records module scopes (torch 2.13, checked on an export): every node
carries metadata_props
    "pkg.torch.onnx.name_scopes": "['', 'decoder.convs.3', 'decoder.convs.3.conv', 'conv2d_12']"
      (a Python list literal: the fully qualified module path of each enclosing module, root '',
       then the aten op's local name as the last entry), and
    "namespace": ": <wrapper class>/decoder.convs.3: export.networks.StyledConv/.../conv2d_12: aten.conv2d.default"
      (the same path as "/"-separated "<path>: <class>" items).
`node_scope` reads name_scopes (namespace as a fallback) and returns the innermost module path;
nodes created by later rewrites may lack both and then match no scope. export.onnx exports a thin
wrapper module holding the model as `model`, and strips that "model." prefix from both keys, so
the paths in an sgex graph are StyleGANEX module paths ("decoder.conv1", "encoder.fusion.0").

Dtype handling: Cast(to=FLOAT), ConstantOfShape's value, RandomNormal/RandomUniform(+Like) and
EyeLike dtypes follow their node's precision; float Constants become initializers. Inputs whose
type is fixed by the op, not by the data (Resize roi/scales, Upsample scales, the fused modconv's
style and noise_strength), stay FP32; integer inputs (shapes, sizes, axes) are never touched.
Float initializers read by FP16 nodes get an FP16 copy (clipped to +-65504); the FP32 original is
kept only while an FP32 node still reads it.
"""

from __future__ import annotations

import ast
import copy
import json
import logging
from pathlib import Path

from runtime.errors import SgexError

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "DEFAULT_RULES",
    "default_plan",
    "load_plan",
    "validate_plan",
    "convert_to_fp16",
    "fp32_reasons",
    "node_scope",
    "node_compute_dtypes",
]

log = logging.getLogger(__name__)

PLAN_FORMAT = "sgex-precision-plan"
PLAN_VERSION = 1
DEFAULT_RULES = {"io_fp32": True, "vectors_fp32": True}
FP16_MAX = 65504.0

# Default FP32 islands per task graph, as module-path prefixes of export.networks.StyleGANEX.
# NVIDIA's StyleGAN2-ADA/3 keep the lowest resolutions in FP32; in StyleGANEX the lowest
# resolution is the first-layer feature F = H/8, where the encoder's fused feature enters the
# generator (decoder.conv1, 512 channels, dilation 8). The demodulation chain and the per-sample
# normalisation statistics of sketch/mask are already covered by the vectors_fp32 rule.
DEFAULT_SCOPES = {
    "synth": ["decoder.conv1", "decoder.to_rgb1"],
    "translate": ["decoder.conv1", "decoder.to_rgb1"],
    "style": [],
}

# op -> indices of float inputs whose type the op fixes to float32 regardless of the data type.
_FIXED_FP32_INPUTS = {
    ("", "Resize"): {1, 2},
    ("", "Upsample"): {1},
    ("ai.onnx.contrib", "FusedModulatedConv2d"): {2, 4},  # style, noise_strength: type S (kept FP32)
}
# Custom ops known to accept FP16 data (their typing rule is _FIXED_FP32_INPUTS); others stay FP32.
_FP16_CUSTOM_OPS = {("ai.onnx.contrib", "FusedModulatedConv2d")}
# Ops that accept any input type and have non-float outputs: no Cast is inserted in front of them.
_TYPE_AGNOSTIC = {"Shape", "Size"}
# Ops with a dtype attribute naming their float output type (default FLOAT when absent).
_DTYPE_ATTR_OPS = {"RandomNormal": "dtype", "RandomUniform": "dtype", "RandomNormalLike": "dtype",
                   "RandomUniformLike": "dtype", "EyeLike": "dtype"}


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------

def default_plan(task: str) -> dict:
    """The default precision plan of a task (runtime.tasks names), as a JSON-ready dict."""
    from runtime.tasks import get_task

    t = get_task(task)
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "task": t.name,
        "source": "default",
        "rules": dict(DEFAULT_RULES),
        "graphs": {g: {"fp32_scopes": list(DEFAULT_SCOPES[g]), "fp32_nodes": []} for g in t.graphs},
        "notes": "default plan: graph I/O and every vector node (mapping, modulation, demodulation, "
                 "w+ arithmetic, normalisation statistics) FP32, plus the first generator layer at "
                 "F = H/8 where the encoder feature enters; everything spatial FP16. Replace with a "
                 "calibrated plan from sgex-calib for real checkpoints.",
    }


def validate_plan(plan, task: str | None = None, source: str = "precision plan") -> dict:
    """Check a plan's format, version, rules and graphs; SgexError (one line) when it is bad.
    Returns the plan with missing rules filled from DEFAULT_RULES."""
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        fmt = plan.get("format") if isinstance(plan, dict) else type(plan).__name__
        raise SgexError(f"{source}: not an sgex precision plan (format {fmt!r}, expected {PLAN_FORMAT!r})")
    if plan.get("version") != PLAN_VERSION:
        raise SgexError(f"{source}: plan version {plan.get('version')!r} is not supported "
                        f"(expected {PLAN_VERSION})")
    if task is not None and plan.get("task") not in (None, task):
        raise SgexError(f"{source}: plan is for task {plan.get('task')!r}, not {task!r}")
    rules = plan.get("rules", {})
    if not isinstance(rules, dict) or set(rules) - set(DEFAULT_RULES) or not all(
            isinstance(v, bool) for v in rules.values()):
        raise SgexError(f"{source}: 'rules' must map {sorted(DEFAULT_RULES)} to true/false, got {rules!r}")
    graphs = plan.get("graphs")
    if not isinstance(graphs, dict):
        raise SgexError(f"{source}: 'graphs' must be an object of graph name -> "
                        f"{{fp32_scopes, fp32_nodes}}")
    allowed = {"style", "synth", "translate"}
    if task is not None:
        from runtime.tasks import get_task

        allowed = set(get_task(task).graphs)
    for name, g in graphs.items():
        if name not in allowed:
            raise SgexError(f"{source}: unknown graph {name!r} (this task has {', '.join(sorted(allowed))})")
        if not isinstance(g, dict) or set(g) - {"fp32_scopes", "fp32_nodes"}:
            raise SgexError(f"{source}: graph {name!r} must have only fp32_scopes and fp32_nodes")
        for f in ("fp32_scopes", "fp32_nodes"):
            v = g.get(f, [])
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise SgexError(f"{source}: graphs.{name}.{f} must be a list of strings")
    out = copy.deepcopy(plan)
    out["rules"] = {**DEFAULT_RULES, **rules}
    return out


def load_plan(path: str | Path, task: str | None = None) -> dict:
    """Read and validate a plan file (SgexError on a missing, non-JSON or invalid file)."""
    p = Path(path)
    if not p.is_file():
        raise SgexError(f"precision plan {p} does not exist")
    try:
        plan = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SgexError(f"precision plan {p}: not valid JSON ({e})") from None
    return validate_plan(plan, task, source=f"precision plan {p}")


# ---------------------------------------------------------------------------------------------
# graph analysis
# ---------------------------------------------------------------------------------------------

def node_scope(node) -> str | None:
    """Innermost module path of a node from the dynamo exporter's metadata ('' = the root module),
    or None when the node carries no scope metadata."""
    props = {p.key: p.value for p in node.metadata_props}
    s = props.get("pkg.torch.onnx.name_scopes")
    if s:
        try:
            scopes = ast.literal_eval(s)
        except (ValueError, SyntaxError):
            scopes = None
        if isinstance(scopes, list) and scopes:
            return scopes[-2] if len(scopes) >= 2 else ""
    ns = props.get("namespace")
    if ns:
        parts = [p.split(":", 1)[0].strip() for p in ns.split("/")]
        return parts[-2] if len(parts) >= 2 else ""
    return None


def _scope_matches(scope: str | None, prefixes) -> bool:
    if scope is None:
        return False
    return any(scope == p or scope.startswith(p + ".") for p in prefixes if p)


def _type_table(model):
    """name -> (elem_type, dims or None) for every typed value; dims entries are int or str."""
    import onnx

    g = model.graph
    table = {}

    def add(vi):
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            return
        dims = None
        if t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        table[vi.name] = (t.elem_type, dims)

    for vi in list(g.input) + list(g.value_info) + list(g.output):
        add(vi)
    for init in g.initializer:
        table[init.name] = (init.data_type, list(init.dims))
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            t = onnx.helper.get_attribute_value(n.attribute[0]) if n.attribute else None
            if isinstance(t, onnx.TensorProto):
                table[n.output[0]] = (t.data_type, list(t.dims))
    return table


def _is_vector(dims) -> bool:
    if dims is None:
        return False
    if len(dims) <= 3:
        return True
    return all(d == 1 for d in dims[2:])


def fp32_reasons(model, graph_plan: dict | None, rules: dict | None = None) -> dict[str, str]:
    """{node name: reason} for every float-computing node of an FP32 model that the plan keeps in
    FP32 (reasons: name, scope, vector, const, unknown, custom; see the module docstring).
    Nodes not listed compute in FP16."""
    import onnx

    rules = {**DEFAULT_RULES, **(rules or {})}
    graph_plan = graph_plan or {}
    names = set(graph_plan.get("fp32_nodes", []))
    scopes = list(graph_plan.get("fp32_scopes", []))
    F = onnx.TensorProto.FLOAT
    types = _type_table(model)
    g = model.graph
    const = {i.name for i in g.initializer}
    out = {}
    for n in g.node:
        outs = [o for o in n.output if o]
        ins = [i for i in n.input if i]
        if n.op_type == "Constant" or all(i in const for i in ins):
            const.update(outs)  # constant subgraph (weight preprocessing)
        float_outs = [o for o in outs if types.get(o, (None,))[0] == F]
        if not float_outs:
            continue
        if n.name in names:
            out[n.name] = "name"
        elif _scope_matches(node_scope(n), scopes):
            out[n.name] = "scope"
        elif n.op_type == "Constant" or (ins and all(i in const for i in ins)):
            out[n.name] = "const"
        elif n.domain not in ("", "ai.onnx") and (n.domain, n.op_type) not in _FP16_CUSTOM_OPS:
            out[n.name] = "custom"
        elif any(types[o][1] is None for o in float_outs):
            out[n.name] = "unknown"
        elif rules["vectors_fp32"] and all(_is_vector(types[o][1]) for o in float_outs):
            out[n.name] = "vector"
    return out


def node_compute_dtypes(model) -> dict[str, set[int]]:
    """{node name: set of float elem types (FLOAT / FLOAT16) among its float inputs and outputs},
    read off a converted model's value types (inputs fixed by the op, e.g. Resize scales, are left
    out). Used by tests and reports to check that plan-FP32 nodes hold no FP16 tensor."""
    import onnx

    types = _type_table(model)
    fl = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    res = {}
    for n in model.graph.node:
        fixed = _FIXED_FP32_INPUTS.get((n.domain or "", n.op_type), set())
        vals = [v for i, v in enumerate(n.input) if v and i not in fixed] + [o for o in n.output if o]
        res[n.name] = {types[v][0] for v in vals if v in types and types[v][0] in fl}
    return res


# ---------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------

def _constants_to_initializers(model) -> None:
    """Float Constant nodes (value / value_float / value_floats) -> initializers, so constants are
    converted in one place."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    g = model.graph
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1:
            a = n.attribute[0]
            arr = None
            if a.name == "value" and a.t.data_type == onnx.TensorProto.FLOAT:
                arr = numpy_helper.to_array(a.t)
            elif a.name == "value_float":
                arr = np.array(a.f, dtype=np.float32)
            elif a.name == "value_floats":
                arr = np.array(list(a.floats), dtype=np.float32)
            if arr is not None:
                g.initializer.append(numpy_helper.from_array(arr.astype(np.float32), n.output[0]))
                continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _retype_attributes(n, H) -> None:
    """Dtype-carrying attributes of an FP16 node: FLOAT -> FLOAT16."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    F = onnx.TensorProto.FLOAT
    if n.domain not in ("", "ai.onnx"):
        return
    if n.op_type == "Cast":
        for a in n.attribute:
            if a.name == "to" and a.i == F:
                a.i = H
    elif n.op_type == "ConstantOfShape":
        val = [a for a in n.attribute if a.name == "value"]
        if not val:  # default value is a float32 zero
            n.attribute.append(helper.make_attribute(
                "value", numpy_helper.from_array(np.zeros((1,), np.float16))))
        elif val[0].t.data_type == F:
            arr = numpy_helper.to_array(val[0].t).astype(np.float16)
            val[0].t.CopyFrom(numpy_helper.from_array(arr, val[0].t.name))
    elif n.op_type in _DTYPE_ATTR_OPS:
        attr = _DTYPE_ATTR_OPS[n.op_type]
        dt = [a for a in n.attribute if a.name == attr]
        if dt and dt[0].i == F:
            dt[0].i = H
        elif not dt and not n.op_type.endswith("Like"):
            n.attribute.append(helper.make_attribute(attr, H))
        # *Like ops without dtype copy their input's dtype, which already follows the node


def convert_to_fp16(model, graph_plan: dict | None = None, rules: dict | None = None):
    """FP32 ModelProto -> FP16 ModelProto with the plan's FP32 islands (see module docstring).

    Args:
        model: an FP32 onnx.ModelProto (not modified). Large graphs: load it with its weights;
            the result holds FP16 weights plus FP32 copies only where FP32 nodes read them.
        graph_plan: {"fp32_scopes": [...], "fp32_nodes": [...]} for this graph (plan["graphs"][name]).
        rules: {"io_fp32": bool, "vectors_fp32": bool}; missing keys take DEFAULT_RULES.

    Returns:
        a new ModelProto whose value_info carries the converted types; graph input/output names are
        unchanged. Control-flow subgraphs (If/Loop/Scan) are refused.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rules = {**DEFAULT_RULES, **(rules or {})}
    F, H = TensorProto.FLOAT, TensorProto.FLOAT16
    m = copy.deepcopy(model)
    g = m.graph
    for n in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise SgexError(f"convert_to_fp16: node {n.name!r} ({n.op_type}) has a subgraph; "
                            f"control flow is not supported")
    _constants_to_initializers(m)
    if not any(vi for vi in g.value_info):
        m = onnx.shape_inference.infer_shapes(m)
        g = m.graph
    taken = {n.name for n in g.node} | {v for n in g.node for v in list(n.input) + list(n.output)}
    taken |= {i.name for i in g.initializer} | {i.name for i in g.input}
    for i, n in enumerate(g.node):  # every node needs a name for plans and reports
        if not n.name:
            n.name = _unique(f"{n.op_type}_{i}", taken)

    types = _type_table(m)
    keep32 = fp32_reasons(m, graph_plan, rules)
    inits = {i.name: i for i in g.initializer}
    graph_outputs = [o.name for o in g.output]

    def is_float(v):
        return types.get(v, (None,))[0] == F

    def node_fp16(n) -> bool:
        return n.name not in keep32 and any(is_float(o) for o in n.output if o)

    io_dtype = F if rules["io_fp32"] else H
    # avail[value][dtype] = name of that value in that dtype
    avail: dict[str, dict[int, str]] = {}
    for vi in list(g.input) + list(g.output):
        if is_float(vi.name):
            vi.type.tensor_type.elem_type = io_dtype
    for i in g.input:
        if is_float(i.name):
            avail[i.name] = {io_dtype: i.name}
    # Initializers: an FP16 copy on demand; the FP32 original survives only if something reads it.
    new_inits = []
    fp16_init_name: dict[str, str] = {}
    clipped = []

    def init_as(v, dtype):
        if dtype == F:
            return v
        if v not in fp16_init_name:
            arr = numpy_helper.to_array(inits[v])
            if np.abs(arr).max(initial=0.0) > FP16_MAX:
                clipped.append(v)
            arr16 = np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)
            name = _unique(f"{v}__fp16", taken)
            new_inits.append(numpy_helper.from_array(arr16, name))
            fp16_init_name[v] = name
        return fp16_init_name[v]

    new_nodes = []
    new_vi: dict[str, tuple[int, list]] = {}  # value -> (elem type, dims) for value_info

    def get_as(v, dtype):
        """Name of value v in dtype, inserting a Cast (once per value and dtype) when needed."""
        if v in inits and inits[v].data_type == F:
            return init_as(v, dtype)
        have = avail[v]
        if dtype in have:
            return have[dtype]
        src = next(iter(have.values()))
        name = _unique(f"{v}__{'fp16' if dtype == H else 'fp32'}", taken)
        new_nodes.append(helper.make_node("Cast", [src], [name], to=dtype,
                                          name=_unique(f"Cast_{name}", taken)))
        have[dtype] = name
        new_vi[name] = (dtype, types.get(v, (None, None))[1])
        return name

    out_names = set(graph_outputs)
    n_fp16 = 0
    for n in list(g.node):
        fp16 = node_fp16(n)
        n_fp16 += fp16
        want = H if fp16 else F
        fixed = _FIXED_FP32_INPUTS.get((n.domain or "", n.op_type), set())
        agnostic = n.op_type in _TYPE_AGNOSTIC and n.domain in ("", "ai.onnx")
        for idx, v in enumerate(n.input):
            if not v or not is_float(v):
                continue
            if agnostic:  # reads only the shape: any dtype will do
                n.input[idx] = v if v in inits else next(iter(avail[v].values()))
                continue
            n.input[idx] = get_as(v, F if idx in fixed else want)
        if fp16:
            _retype_attributes(n, H)
        outs_to_cast = []
        for idx, o in enumerate(n.output):
            if not o or not is_float(o):
                continue
            if o in out_names and want != io_dtype:
                name = _unique(f"{o}__{'fp16' if want == H else 'fp32'}", taken)
                n.output[idx] = name
                outs_to_cast.append(o)
            avail[o] = {want: n.output[idx]}
            if want == H or n.output[idx] != o:
                new_vi[n.output[idx]] = (want, types.get(o, (None, None))[1])
        new_nodes.append(n)
        for o in outs_to_cast:
            new_nodes.append(helper.make_node("Cast", [avail[o][want]], [o], to=io_dtype,
                                              name=_unique(f"Cast_{o}", taken)))
            avail[o][io_dtype] = o

    # initializers: drop FP32 originals nobody reads any more
    read = {v for n in new_nodes for v in n.input} | out_names
    kept = [i for i in g.initializer if i.name in read]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    del g.node[:]
    g.node.extend(new_nodes)

    # value_info: converted types, casts added
    vis = {vi.name: vi for vi in g.value_info}
    for name, (dtype, dims) in new_vi.items():
        if name in vis:
            vis[name].type.tensor_type.elem_type = dtype
        elif name not in out_names:
            shape = None if dims is None else [d if isinstance(d, int) else (None if d == "?" else d)
                                               for d in dims]
            g.value_info.append(helper.make_tensor_value_info(name, dtype, shape))
    live = {v for n in g.node for v in list(n.input) + list(n.output)} - out_names
    kept_vi = [vi for vi in g.value_info if vi.name in live]
    del g.value_info[:]
    g.value_info.extend(kept_vi)

    if clipped:
        log.warning("fp16: %d initializer(s) exceeded the FP16 range and were clipped to +-65504: %s",
                    len(clipped), ", ".join(clipped[:5]))
    reasons = {}
    for r in keep32.values():
        reasons[r] = reasons.get(r, 0) + 1
    log.info("fp16: %d nodes FP16, %d FP32 (%s)", n_fp16, len(keep32),
             ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none")
    return m

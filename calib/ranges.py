"""Per-tensor activation statistics of an FP32 ONNX graph over a calibration set.

Every float tensor a node produces is made a graph output and run on ONNX Runtime (CPU); each
tensor gets max |x|, percentiles of |x| (per sample, then the maximum over samples: a
conservative bound that needs no stored activations), NaN/Inf counts and its shape. Initializers
get max |x| too (an FP16 weight can overflow as well). Percentiles of tensors above 2^20
elements are taken from an even stride of 2^20 of them; max |x| and the NaN/Inf counts are exact.

Memory bound: intermediate outputs are requested in chunks whose estimated total size (from ONNX
shape inference at the calibration shapes) stays under `max_bytes`; a graph whose activations do
not fit runs once per chunk, each run with a fresh session.

Layer names: the dynamo exporter records each node's module path in its metadata
(`pkg.torch.onnx.name_scopes` = ['', 'decoder', 'decoder.convs.3', ..., '<op>'], and
`namespace` = ': Cls/decoder: Cls/.../op: aten.op'). `node_scope` returns the deepest module path
('' for ops at the top level) and `layer_scope` truncates it to the layer a plan names
("decoder.convs.3", "encoder.fusion.0", "decoder.conv1").
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
PERCENTILES = (99.0, 99.9)
PERCENTILE_SAMPLE = 1 << 20  # elements per tensor and sample the percentiles are computed from
DEFAULT_MAX_BYTES = 1 << 30
CUSTOM_DOMAIN = "ai.onnx.contrib"  # kernels.onnx_op.DOMAIN, kept here so this module imports without torch
_FLOAT_TYPES = (1, 10, 11, 16)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16 (onnx.TensorProto enums)


@dataclass
class TensorStats:
    name: str
    producer: str | None  # node name, None for graph inputs and initializers
    op: str | None
    scope: str  # module path of the producer ('' when unknown or top level)
    shape: list[int] = field(default_factory=list)  # last seen shape
    absmax: float = 0.0
    percentiles: dict[str, float] = field(default_factory=dict)  # "p99" -> max over samples of the 99th pct of |x|
    nan: int = 0
    inf: int = 0
    samples: int = 0
    initializer: bool = False

    def update(self, value: np.ndarray) -> None:
        v = np.asarray(value)
        self.shape = list(v.shape)
        self.samples += 1
        if v.size == 0:
            return
        v = v.astype(np.float32, copy=False)
        finite = np.isfinite(v)
        self.nan += int(np.isnan(v).sum())
        self.inf += int(np.isinf(v).sum())
        a = np.abs(v[finite]) if not finite.all() else np.abs(v).ravel()
        if a.size == 0:
            return
        self.absmax = max(self.absmax, float(a.max()))
        if a.size > PERCENTILE_SAMPLE:  # percentiles from an even stride (absmax above is exact)
            a = a[:: -(-a.size // PERCENTILE_SAMPLE)]
        qs = np.percentile(a, PERCENTILES)
        for p, q in zip(PERCENTILES, qs):
            key = f"p{p:g}"
            self.percentiles[key] = max(self.percentiles.get(key, 0.0), float(q))

    def overflows(self, headroom: float) -> bool:
        """True if max |x| * headroom reaches the FP16 range, or the FP32 value is not finite."""
        return self.absmax * headroom >= FP16_MAX or self.nan > 0 or self.inf > 0


def node_scope(node) -> str:
    """The deepest module path of an exported node ('' if the exporter recorded none); the
    metadata is parsed by export.fp16.node_scope, the one reader of the exporter's scopes."""
    from export.fp16 import node_scope as exported_scope

    return exported_scope(node) or ""


REFERENCE_ROOTS = ("encoder", "decoder")  # top-level modules of export.networks.StyleGANEX


def layer_scope(scope: str) -> str:
    """Truncate a module path to the layer a plan names. Wrapper modules an exporter puts above
    the reference ("model.decoder...") are kept as a prefix; from the reference root (encoder /
    decoder) on, cut after the first numeric component (a ModuleList index:
    "decoder.convs.3.conv.modulation" -> "decoder.convs.3"), otherwise keep two components
    ("model.decoder.conv1.conv" -> "model.decoder.conv1")."""
    if not scope:
        return ""
    parts = scope.split(".")
    k = next((i for i, p in enumerate(parts) if p in REFERENCE_ROOTS), 0)
    rel = parts[k:]
    for i, p in enumerate(rel):
        if p.isdigit():
            return ".".join(parts[:k] + rel[: i + 1])
    return ".".join(parts[:k] + rel[:2])


def scope_matches(scope: str, prefix: str) -> bool:
    """Module-path prefix match on whole components ("decoder.convs.1" does not match "decoder.convs.10")."""
    return bool(prefix) and (scope == prefix or scope.startswith(prefix + "."))


def load_model(model):
    """ModelProto or path -> ModelProto."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model))
    return model


def tensor_sizes(model, feeds: dict[str, np.ndarray] | None = None) -> dict[str, int]:
    """{name: estimated bytes} of every floating-point node output, in node order.

    One ONNX shape inference pass, with the graph inputs fixed to the feeds' shapes when given.
    Custom-op outputs of unknown type follow their first float input (FusedModulatedConv2d), and
    a tensor of unknown shape is estimated as the largest of its producer's inputs."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if feeds:
        del m.graph.value_info[:]
        for vi in m.graph.input:
            if vi.name in feeds:
                shp = vi.type.tensor_type.shape
                for d, n in zip(shp.dim, feeds[vi.name].shape):
                    d.Clear()
                    d.dim_value = int(n)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=bool(feeds))
    except Exception as e:  # custom domains or huge models: propagate below
        log.debug("shape inference failed (%s); propagating dtypes from inputs", e)
    g = m.graph
    types: dict[str, int] = {}
    sizes: dict[str, int] = {k: int(v.nbytes) for k, v in (feeds or {}).items()}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.elem_type:
            types[vi.name] = t.elem_type
        dims = t.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            sizes[vi.name] = int(np.prod([d.dim_value for d in dims])) * 4
    for init in g.initializer:
        types[init.name] = init.data_type
        sizes[init.name] = int(np.prod(init.dims)) * 4
    out: dict[str, int] = {}
    for node in g.node:
        for o in node.output:
            if not o:
                continue
            if o not in types:
                if node.op_type == "Cast":
                    types[o] = next(a.i for a in node.attribute if a.name == "to")
                else:
                    known = [types[x] for x in node.input if x in types and types[x] in _FLOAT_TYPES]
                    if known:
                        types[o] = known[0]
            if o not in sizes:
                ins = [sizes[x] for x in node.input if x in sizes]
                sizes[o] = max(ins) if ins else 4
            if types.get(o) in _FLOAT_TYPES:
                out[o] = sizes[o]
    return out


def float_tensor_names(model) -> list[str]:
    """Names of the floating-point node outputs, in node order."""
    return list(tensor_sizes(model))


def chunk_names(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Split names (in order) into chunks whose total estimated bytes stay under max_bytes
    (a single tensor larger than the budget gets a chunk of its own)."""
    chunks: list[list[str]] = []
    cur: list[str] = []
    total = 0
    for n, b in sizes.items():
        if cur and total + b > max_bytes:
            chunks.append(cur)
            cur, total = [], 0
        cur.append(n)
        total += b
    if cur:
        chunks.append(cur)
    return chunks


def with_outputs(model, names: Iterable[str]):
    """A copy of the model whose graph outputs are its own outputs plus `names` (untyped value
    infos: ONNX Runtime infers their types)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            vi = onnx.ValueInfoProto()
            vi.name = n
            m.graph.output.append(vi)
            have.add(n)
    return m


SessionFactory = Callable[[object], object]


def default_session(model):
    """An ONNX Runtime CPU session for a ModelProto, graph optimizations off; registers the sgex
    custom op library when the graph uses the ai.onnx.contrib domain (FusedModulatedConv2d)."""
    import onnxruntime as ort

    opts = None
    if any(n.domain == CUSTOM_DOMAIN for n in model.graph.node):
        from kernels.onnx_op import DOMAIN, ort_session_options

        assert DOMAIN == CUSTOM_DOMAIN
        opts = ort_session_options()
    if opts is None:
        opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # the graph as written: no fusions between the FP32 reference and the FP16 candidate, and
    # session set-up in a fraction of the time on graphs with every intermediate as an output
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def run_intermediates(
    model,
    feeds_list: list[dict[str, np.ndarray]],
    names: list[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    session: SessionFactory = default_session,
    progress: Callable[[int], None] | None = None,
    sizes: dict[str, int] | None = None,
):
    """Yield (chunk_names, per-sample list of {name: value}) for the requested tensors, one chunk
    at a time, so at most one chunk's activations are alive. sizes: bytes per name (default:
    tensor_sizes at the first feeds' shapes)."""
    if not feeds_list:
        return
    if sizes is None:
        sizes = tensor_sizes(model, feeds_list[0])
    chunks = chunk_names({n: sizes.get(n, 4) for n in names}, max_bytes)
    if len(chunks) > 1:
        log.info("activations exceed %.0f MiB: %d passes over the calibration set", max_bytes / 2**20, len(chunks))
    for chunk in chunks:
        sess = session(with_outputs(model, chunk))
        out_names = [o.name for o in sess.get_outputs() if o.name in set(chunk)]
        results = []
        for feeds in feeds_list:
            vals = sess.run(out_names, feeds)
            results.append(dict(zip(out_names, vals)))
            if progress:
                progress(1)
        yield chunk, results
        del sess, results


@dataclass
class RangeTable:
    """Statistics of every float tensor of one graph (keyed by tensor name)."""

    tensors: dict[str, TensorStats]
    samples: int

    def to_json(self) -> dict:
        return {"samples": self.samples, "tensors": {k: asdict(v) for k, v in self.tensors.items()}}

    def by_scope(self) -> dict[str, float]:
        """max |x| per layer scope (reference layer names), for reports."""
        out: dict[str, float] = {}
        for t in self.tensors.values():
            if t.initializer:
                continue
            s = layer_scope(t.scope)
            out[s] = max(out.get(s, 0.0), t.absmax)
        return dict(sorted(out.items()))


def collect_ranges(
    model,
    feeds_list: list[dict[str, np.ndarray]],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    session: SessionFactory = default_session,
    progress: Callable[[int], None] | None = None,
    sizes: dict[str, int] | None = None,
    on_values: Callable[[int, dict[str, np.ndarray]], None] | None = None,
) -> RangeTable:
    """Run the FP32 graph over the calibration feeds and return statistics of every float tensor
    (node outputs, graph inputs and float initializers).

    sizes: tensor_sizes(model, feeds_list[0]) when already computed; on_values(i, {name: value})
    sees every chunk of sample i's intermediates (to keep them, e.g. as a reference)."""
    from onnx import numpy_helper

    model = load_model(model)
    g = model.graph
    producer = {}
    for node in g.node:
        for out in node.output:
            producer[out] = node
    stats: dict[str, TensorStats] = {}
    for init in g.initializer:
        if init.data_type in _FLOAT_TYPES:
            t = TensorStats(init.name, None, None, "", initializer=True)
            t.update(numpy_helper.to_array(init))
            stats[init.name] = t
    init_names = {i.name for i in g.initializer}
    for vi in g.input:
        if vi.name not in init_names and feeds_list and vi.name in feeds_list[0]:
            t = TensorStats(vi.name, None, None, "")
            for f in feeds_list:
                t.update(f[vi.name])
            stats[vi.name] = t
    if sizes is None:
        sizes = tensor_sizes(model, feeds_list[0] if feeds_list else None)
    names = list(sizes)
    for n in names:
        node = producer[n]
        stats[n] = TensorStats(n, node.name, node.op_type, node_scope(node))
    for _chunk, results in run_intermediates(model, feeds_list, names, max_bytes=max_bytes, session=session,
                                             progress=progress, sizes=sizes):
        for i, res in enumerate(results):
            for n, v in res.items():
                stats[n].update(v)
            if on_values is not None:
                on_values(i, res)
    return RangeTable(stats, len(feeds_list))

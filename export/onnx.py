"""Per-bucket ONNX export of one task: graphs with dynamic batch/height/width and a manifest.

One task directory (layout and manifest schema: runtime/manifest.py):

    <out>/<task>/style/style.onnx        RGB tasks: x2 [B,3,256,256] -> wplus [B,18,D]; exported once,
                                         shared by all buckets
    <out>/<task>/<side>/synth.onnx       x1 [B,3,H,W], wplus [B,18,D] (+ editing_w [B,18,D] for edit,
                                         + noise_0..16 for tasks with random noise) -> y [B,3,4H,4W]
    <out>/<task>/<side>/translate.onnx   x [B,1|19,H,W], z [B,D] (+ noise_0..16) -> y [B,3,4H,4W]
    <out>/<task>/editing_w.npy           edit: checkpoint editing_w[0:1], float32 [1,18,D]
    <out>/<task>/manifest.json

Buckets are named by the output side R (runtime/buckets.py). Dynamic axes: H and W are torch.export
dims derived from roots h8/w8 in 1..R/32 (H = 8*h8), so a graph accepts every x1 side that is a
multiple of 8 from 8 up to R/4 (8 is the smallest: f is then 1x1); noise dims are derived from the
same roots (noise_j is [B,1,H*u_j/8,W*u_j/8], u_j = runtime.tasks.noise_shapes). torch.export
specializes a dim traced at size 1, so graphs are traced at batch 2 and h8 = w8 = TRACE_ROOT, a size
at which no intermediate map is 1 pixel wide (a bucket smaller than that is exported with roots up
to TRACE_ROOT). Graph I/O dims are named batch / height / width ("height/8", "4*height", ...) in
the ONNX file and the manifest.

Files: ir_version 10 (ONNX Runtime >= 1.20 and TensorRT 10 read it), opset 18 by default,
single file with embedded weights (the full-size style graph is ~1.07 GB, under protobuf's
2 GB limit; a graph over it is refused rather than split), checked with
onnx.checker.check_model(path, full_check=True). Everything is written to temp names in a
staging directory next to the task directory and moved in only when every graph passed; a
failed export leaves nothing behind.

Flavors: "portable" = standard ONNX ops only; "plugin" = every stride-1 modulated conv is one
ai.onnx.contrib FusedModulatedConv2d node (kernels/onnx_op.py), run by the TensorRT plugin or,
on ONNX Runtime, with kernels.onnx_op.ort_session_options().
Precision: "fp16" writes the graph through export.fp16.convert_to_fp16 with a precision plan.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from runtime.buckets import DEFAULT_MAX_BATCH, MIN_SIDE
from runtime.errors import SgexError
from runtime.manifest import MANIFEST_NAME, Manifest, atomic_write_bytes, graph_key, sha256_file
from runtime.tasks import ALIGNED_SIZE, N_LATENT, N_NOISE, OUTPUT_SCALE, SIZE_MULTIPLE, get_task, noise_shapes

__all__ = [
    "DEFAULT_OPSET",
    "IR_VERSION",
    "PRECISIONS",
    "FLAVORS",
    "export_task",
    "export_graph",
    "graph_io",
    "graph_file",
    "manifest_inputs",
    "ort_session",
]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 18  # the dynamo exporter emits opset >= 18
IR_VERSION = 10
PRECISIONS = ("fp32", "fp16")
FLAVORS = ("portable", "plugin")
PROTOBUF_LIMIT = 2 ** 31 - 1
TRACE_BATCH = 2  # torch.export specializes dims traced at 1
TRACE_ROOT = 8  # h8 = w8 = 8 at trace time (x1 64x64: the encoder's deepest map c3 is 4x4)


# ---------------------------------------------------------------------------------------------
# graph signatures (pure data; shared with the manifest)
# ---------------------------------------------------------------------------------------------

def _scaled(axis: str, num: int, den: int) -> str | int:
    """Symbolic name of axis * num / den ("height/8", "4*height", "height")."""
    from math import gcd

    g = gcd(num, den)
    num, den = num // g, den // g
    if den == 1:
        return axis if num == 1 else f"{num}*{axis}"
    return f"{axis}/{den}" if num == 1 else f"{num}*{axis}/{den}"


def _noise_factors() -> list[int]:
    """u_j with noise_j spatial size = x1 size * u_j / 8 (independent of the size)."""
    return [h * 8 // 64 for h, _ in noise_shapes(64, 64)]


def graph_io(task: str, graph: str, style_dim: int) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of a task graph as manifest entries {name, dtype, shape}; shapes use the
    symbols batch / height / width (x1 height and width; multiples of 8)."""
    t = get_task(task)
    D, L = style_dim, N_LATENT
    noise = [{"name": f"noise_{j}", "dtype": "float32",
              "shape": ["batch", 1, _scaled("height", u, 8), _scaled("width", u, 8)]}
             for j, u in enumerate(_noise_factors())] if t.noise == "random" else []
    y = [{"name": "y", "dtype": "float32",
          "shape": ["batch", 3, _scaled("height", OUTPUT_SCALE, 1), _scaled("width", OUTPUT_SCALE, 1)]}]
    if graph == "style":
        return ([{"name": "x2", "dtype": "float32", "shape": ["batch", 3, ALIGNED_SIZE, ALIGNED_SIZE]}],
                [{"name": "wplus", "dtype": "float32", "shape": ["batch", L, D]}])
    if graph == "synth":
        ins = [{"name": "x1", "dtype": "float32", "shape": ["batch", 3, "height", "width"]},
               {"name": "wplus", "dtype": "float32", "shape": ["batch", L, D]}]
        if t.editing:
            ins.append({"name": "editing_w", "dtype": "float32", "shape": ["batch", L, D]})
        return ins + noise, y
    if graph == "translate":
        return ([{"name": "x", "dtype": "float32", "shape": ["batch", t.in_channels, "height", "width"]},
                 {"name": "z", "dtype": "float32", "shape": ["batch", D]}] + noise, y)
    raise SgexError(f"task {task!r} has no graph {graph!r}")


def graph_file(graph: str, side: int | None) -> str:
    """Relative path of a graph file in the task directory."""
    return f"style/{graph}.onnx" if side is None else f"{side}/{graph}.onnx"


def manifest_inputs(task: str, style_dim: int) -> dict:
    """The manifest's "inputs" section: what every graph input means and how it is normalised."""
    t = get_task(task)
    rgb = {"kind": "rgb", "range": [-1, 1], "layout": "NCHW", "color": "RGB",
           "normalize": "uint8 / 127.5 - 1", "multiple": SIZE_MULTIPLE, "pad": "reflect"}
    noise = {"kind": "noise", "distribution": "standard_normal", "dtype": "float32",
             "generator": "numpy.random.default_rng(seed).standard_normal", "order": "noise_0..noise_16",
             "shapes": "runtime.tasks.noise_shapes(height, width)", "count": N_NOISE}
    if t.in_channels == 3:
        out = {"x1": rgb, "x2": {**rgb, "size": [ALIGNED_SIZE, ALIGNED_SIZE], "aligned": True,
                                 "multiple": None, "pad": None}}
        if t.editing:
            out["editing_w"] = {"kind": "latent", "file": "editing_w.npy", "shape": [1, N_LATENT, style_dim],
                                "scale": "edit_scale (video_editing.py: +scale; web UI: -scale)"}
    elif t.in_channels == 1:
        out = {"x": {"kind": "sketch", "range": [0, 1], "layout": "NCHW", "channels": 1,
                     "normalize": "uint8 / 255", "multiple": SIZE_MULTIPLE, "pad": "reflect"}}
    else:
        out = {"x": {"kind": "mask", "encoding": "one-hot", "classes": t.in_channels, "layout": "NCHW",
                     "multiple": SIZE_MULTIPLE, "pad": "reflect"}}
    if t.inject:
        out["z"] = {"kind": "latent_z", "distribution": "standard_normal", "shape": ["batch", style_dim],
                    "generator": "numpy.random.default_rng(seed).standard_normal"}
    if t.noise == "random":
        out["noise"] = noise
    return out


# ---------------------------------------------------------------------------------------------
# export of one graph
# ---------------------------------------------------------------------------------------------

def _wrappers():
    import torch

    class StyleGraph(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x2):
            return self.model.style(x2)

    class SynthGraph(torch.nn.Module):
        """(x1, wplus[, rest]): rest = [editing_w] for edit, else the 17 noise maps; zero-noise
        tasks without editing take no rest (an empty input list would upset the exporter's
        dynamic-axis naming)."""

        def __init__(self, model, editing: bool):
            super().__init__()
            self.model, self.editing = model, editing

        def forward(self, x1, wplus, rest=None):
            if self.editing:
                return self.model.synth(x1, wplus, rest[0], None)
            return self.model.synth(x1, wplus, None, list(rest) if rest else None)

    class TranslateGraph(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x, z, rest=None):
            return self.model.translate(x, z, list(rest) if rest else None)

    return StyleGraph, SynthGraph, TranslateGraph


def _trace_inputs(task: str, graph: str, style_dim: int, side: int | None, max_batch: int):
    """(module args, dynamic_shapes, input names) for torch.onnx.export(dynamo=True)."""
    import torch
    from torch.export import Dim

    t = get_task(task)
    gen = torch.Generator().manual_seed(0)
    B, D = TRACE_BATCH, style_dim
    batch = Dim("batch", min=1, max=max(max_batch, TRACE_BATCH))

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    if graph == "style":
        return (rand(B, 3, ALIGNED_SIZE, ALIGNED_SIZE),), ({0: batch},), ["x2"]
    roots = max(side // (OUTPUT_SCALE * SIZE_MULTIPLE), TRACE_ROOT)
    h8, w8 = Dim("h8", min=1, max=roots), Dim("w8", min=1, max=roots)
    H = W = SIZE_MULTIPLE * TRACE_ROOT
    spatial = {0: batch, 2: SIZE_MULTIPLE * h8, 3: SIZE_MULTIPLE * w8}
    rest, rest_dyn, rest_names = [], [], []
    if graph == "synth" and t.editing:
        rest, rest_dyn, rest_names = [0.1 * rand(B, N_LATENT, D)], [{0: batch}], ["editing_w"]
    if t.noise == "random":
        for j, u in enumerate(_noise_factors()):
            rest.append(rand(B, 1, H * u // 8, W * u // 8))
            rest_dyn.append({0: batch, 2: (SIZE_MULTIPLE * u // 8) * h8, 3: (SIZE_MULTIPLE * u // 8) * w8})
            rest_names.append(f"noise_{j}")
    if graph == "synth":
        first = rand(B, 3, H, W)
        second, second_dyn, names = rand(B, N_LATENT, D), {0: batch}, ["x1", "wplus"]
    else:
        first = torch.rand(B, t.in_channels, H, W, generator=gen)
        second, second_dyn, names = rand(B, D), {0: batch}, ["x", "z"]
    if not rest:
        return (first, second), (spatial, second_dyn), names
    return (first, second, rest), (spatial, second_dyn, rest_dyn), names + rest_names


_AXIS_RE = re.compile(r"^(?:(\d+)\*)?([A-Za-z_]\w*)$")
_NAMED_RE = re.compile(r"^(?:(\d+)\*)?(height|width)(?:/(\d+))?$")


def _rename_dims(model, outputs: list[dict]) -> None:
    """Name the exporter's dim symbols after the manifest: 'k*h8' -> height-based names (x1
    height = 8*h8), likewise width. An output dim the exporter gave a fresh symbol (the graph
    has no input of that size, e.g. y of a zero-noise graph: '32*s39') is matched against the
    manifest's name ('4*height' = 32*h8) and the symbol renamed everywhere as an alias."""
    g = model.graph
    alias = {"h8": ("height", 1), "w8": ("width", 1)}  # symbol -> (axis, multiplier of h8/w8)
    for vi in list(g.input) + list(g.output):  # dim 0 is the batch everywhere
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].dim_param and _AXIS_RE.match(dims[0].dim_param) and "*" not in dims[0].dim_param:
            alias.setdefault(dims[0].dim_param, ("batch", None))
    for vi, spec in zip(g.output, outputs):
        for d, want in zip(vi.type.tensor_type.shape.dim, spec["shape"]):
            got, named = _AXIS_RE.match(d.dim_param or ""), _NAMED_RE.match(str(want))
            if not (got and named) or got.group(2) in alias:
                continue
            k = int(got.group(1) or 1)
            factor = SIZE_MULTIPLE * int(named.group(1) or 1) / int(named.group(3) or 1)  # in h8 units
            if factor % k == 0:
                alias[got.group(2)] = (named.group(2), int(factor // k))

    def rename(p: str) -> str:
        m = _AXIS_RE.match(p)
        if not m or m.group(2) not in alias:
            return p
        axis, mult = alias[m.group(2)]
        if mult is None:
            return axis if m.group(1) is None else p
        return str(_scaled(axis, int(m.group(1) or 1) * mult, SIZE_MULTIPLE))

    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if not vi.type.HasField("tensor_type"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.dim_param = rename(d.dim_param)


_WRAPPER_ATTR = "model"  # the graph wrappers hold the StyleGANEX as self.model


def _strip_wrapper_scope(model) -> None:
    """Scope metadata relative to StyleGANEX: 'model.decoder.conv1' -> 'decoder.conv1' in
    pkg.torch.onnx.name_scopes and namespace, so precision plans name reference module paths."""
    pre = _WRAPPER_ATTR + "."
    for n in model.graph.node:
        for p in n.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = ast.literal_eval(p.value)
                except (ValueError, SyntaxError):
                    continue
                if isinstance(scopes, list):
                    p.value = repr([x[len(pre):] if isinstance(x, str) and x.startswith(pre) else x
                                    for x in scopes])
            elif p.key == "namespace":
                p.value = "/".join(part[len(pre):] if part.startswith(pre) else part
                                   for part in p.value.split("/"))


def _check_io(model, inputs: list[dict], outputs: list[dict], where: str) -> None:
    """The written graph's I/O names and symbolic shapes are exactly the manifest's."""
    import onnx

    def sig(vis):
        out = []
        for vi in vis:
            t = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
            out.append({"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": dims})
        return out

    got_in, got_out = sig(model.graph.input), sig(model.graph.output)
    if got_in != inputs or got_out != outputs:
        raise RuntimeError(f"{where}: exported I/O {got_in} -> {got_out} differs from the expected "
                           f"{inputs} -> {outputs}")


def export_graph(model, task: str, graph: str, path: str | os.PathLike, *, side: int | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, opset: int = DEFAULT_OPSET, flavor: str = "portable",
                 precision: str = "fp32", plan: dict | None = None) -> dict:
    """Export one graph of `model` (export.networks.StyleGANEX, eval) to `path`.

    graph: "style" (side None) or "synth"/"translate" with the bucket side. flavor "plugin" needs
    the model's modconv impl set to "plugin". plan: a validated precision plan (fp16 only).
    Returns the manifest entry without file/sha256: {graph, bucket, inputs, outputs, dims, precision,
    flavor, opset, nodes}. The file is written under a temp name and renamed.
    """
    import onnx
    import torch

    t = get_task(task)
    if graph not in t.graphs:
        raise SgexError(f"task {task!r} has no graph {graph!r} (graphs: {', '.join(t.graphs)})")
    if (graph == "style") != (side is None):
        raise ValueError("export_graph: the style graph takes no bucket side; synth/translate need one")
    StyleGraph, SynthGraph, TranslateGraph = _wrappers()
    wrapper = {"style": lambda: StyleGraph(model), "synth": lambda: SynthGraph(model, t.editing),
               "translate": lambda: TranslateGraph(model)}[graph]().eval()
    args, dyn, names = _trace_inputs(task, graph, model.style_dim, side, max_batch)
    inputs, outputs = graph_io(task, graph, model.style_dim)
    assert [i["name"] for i in inputs] == names, (names, inputs)
    table = None
    if flavor == "plugin":
        from kernels.onnx_op import onnx_translation_table, register_onnx_schema

        if model.modconv_impl != "plugin":
            raise ValueError("export_graph(flavor='plugin') needs model.set_modconv_impl('plugin')")
        table = onnx_translation_table()
        register_onnx_schema()
    with torch.no_grad(), _quiet_exporter():
        prog = torch.onnx.export(
            wrapper, args, dynamo=True, dynamic_shapes=dyn, input_names=names,
            output_names=[o["name"] for o in outputs], opset_version=opset, optimize=True,
            custom_translation_table=table, external_data=False)
    if flavor == "plugin":
        from kernels.onnx_op import canonicalize_attributes

        # The TensorRT AOT plugin passes attributes to the kernel compiler by position.
        canonicalize_attributes(prog)
    proto = prog.model_proto
    del prog
    proto.ir_version = IR_VERSION
    _rename_dims(proto, outputs)
    _strip_wrapper_scope(proto)
    if flavor == "plugin":
        from kernels.onnx_op import DOMAIN, DOMAIN_VERSION, OP_TYPE

        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
        # The style graph (encoder + heads) has no modulated conv; the per-bucket graphs must.
        if graph != "style" and not any(n.op_type == OP_TYPE and n.domain == DOMAIN for n in proto.graph.node):
            raise RuntimeError(f"plugin flavor: no {OP_TYPE} node in the exported {graph} graph")
    if precision == "fp16":
        from export.fp16 import convert_to_fp16

        gplan = (plan or {}).get("graphs", {}).get(graph, {})
        proto = convert_to_fp16(proto, gplan, (plan or {}).get("rules"))
    bucket = None if side is None else {"side": side, "max_batch": max_batch}
    _check_io(proto, inputs, outputs, f"{task} {graph}")
    onnx.helper.set_model_props(proto, {
        "sgex.task": task, "sgex.graph": graph, "sgex.bucket": json.dumps(bucket),
        "sgex.precision": precision, "sgex.flavor": flavor})
    proto.doc_string = f"sgex {task} {graph_key(graph, side)} ({precision}, {flavor})"
    size = proto.ByteSize()
    if size > PROTOBUF_LIMIT:
        raise SgexError(f"{task} {graph} graph is {size / 2**30:.2f} GiB, over protobuf's 2 GiB "
                        f"single-file limit")
    n_nodes = len(proto.graph.node)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        atomic_write_bytes(tmp, proto.SerializeToString())
        del proto
        onnx.checker.check_model(str(tmp), full_check=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dims = {"batch": {"min": 1, "max": max_batch}}
    if side is not None:
        for axis in ("height", "width"):
            dims[axis] = {"min": MIN_SIDE, "max": side // OUTPUT_SCALE, "multiple": SIZE_MULTIPLE}
    return {"graph": graph, "bucket": bucket, "inputs": inputs, "outputs": outputs, "dims": dims,
            "precision": precision, "flavor": flavor, "opset": opset, "nodes": n_nodes}


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress lines and warns about every derived axis name; sgex
    prints its own stages. Errors still propagate."""
    import io
    import warnings

    buf = io.StringIO()
    noisy = [logging.getLogger(n) for n in (
        "onnx_ir", "onnxscript", "torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(max(lg.level, logging.ERROR if lg.name.endswith("_registration") else logging.WARNING))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*axis name.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            with contextlib.redirect_stdout(buf):
                yield
        finally:
            for lg, lv in zip(noisy, levels):
                lg.setLevel(lv)
    if buf.getvalue().strip():
        log.debug("%s", buf.getvalue().strip())


# ---------------------------------------------------------------------------------------------
# export of a task
# ---------------------------------------------------------------------------------------------

class _Stages:
    """'[i/n] label ... done in 1.2s' lines on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.i, self.enabled = total, 0, enabled

    @contextlib.contextmanager
    def __call__(self, label: str):
        self.i += 1
        t0 = time.perf_counter()
        if self.enabled:
            print(f"[{self.i}/{self.total}] {label} ...", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            print(f"[{self.i}/{self.total}] {label} done in {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr, flush=True)


def _versions(opset: int) -> dict:
    from importlib import metadata

    def ver(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    import onnx
    import torch

    return {"sgex": ver("sgex") or "0.1.0", "torch": torch.__version__, "onnx": onnx.__version__,
            "opset": opset, "ir_version": IR_VERSION, "onnxscript": ver("onnxscript")}


def check_args(task, res, precision, flavor, max_batch, opset, ckpt, random_weights, variant=None):
    """The arguments of export_task that need no checkpoint, checked in one place (SgexError);
    returns the task. sgex-export calls it before it prints anything."""
    from runtime.buckets import check_side

    t = _get_task_or_error(task)
    try:
        check_side(res)
    except ValueError as e:
        raise SgexError(str(e)) from None
    if precision not in PRECISIONS:
        raise SgexError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if flavor not in FLAVORS:
        raise SgexError(f"--flavor must be one of {', '.join(FLAVORS)}, got {flavor!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise SgexError(f"--max-batch must be >= 1, got {max_batch}")
    import onnx

    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= top:
        raise SgexError(f"--opset must be in {MIN_OPSET}..{top} (the dynamo exporter needs >= {MIN_OPSET}), "
                        f"got {opset}")
    if bool(ckpt) == bool(random_weights):
        raise SgexError("give exactly one of --ckpt FILE or --random-weights")
    if variant is not None:
        t.variant(variant)  # UnknownName naming the variants
    return t


def _get_task_or_error(task: str):
    try:
        return get_task(task)
    except KeyError as e:
        raise SgexError(e.args[0]) from None


def _load(task: str, ckpt, random_weights: bool, seed: int, variant: str | None, width_div: int):
    """(LoadedCheckpoint, variant name) with the variant checked against the checkpoint."""
    from export import checkpoint as C

    t = get_task(task)
    if variant is not None:
        try:
            want = t.variant(variant)
        except KeyError as e:
            raise SgexError(e.args[0]) from None
    ck = C.load_or_random(task, os.fspath(ckpt) if ckpt else None, random_weights, seed=seed,
                          width_div=width_div, variant=variant if random_weights else None)
    name = ck.variant
    if variant is not None and variant != ck.variant:
        have = t.variant(ck.variant)
        if (have.n_fusion, have.use_att) != (want.n_fusion, want.use_att):
            raise SgexError(f"--variant {variant} does not match the checkpoint ({ck.variant}: "
                            f"{have.n_fusion} fusion layers, {want.n_fusion} expected)")
        name = variant  # same architecture (e.g. toonify styles): the label is the user's
    return ck, name


def export_task(task: str, res: int, *, ckpt: str | os.PathLike | None = None, random_weights: bool = False,
                out: str | os.PathLike = "artifacts", precision: str = "fp32", plan: str | os.PathLike | dict | None = None,
                flavor: str = "portable", max_batch: int = DEFAULT_MAX_BATCH, opset: int = DEFAULT_OPSET,
                seed: int = 0, variant: str | None = None, width_div: int = 1, progress: bool = True) -> Path:
    """Export the graphs of `task` for bucket `res` into <out>/<task>/ and write/merge its manifest.

    The style graph (RGB tasks) is exported once per task directory and reused by later buckets
    when its file still matches the manifest. Adding a bucket to an existing directory needs the
    same checkpoint (sha256, or random seed), precision, flavor and variant: otherwise SgexError.
    plan: a precision plan dict or JSON file (fp16 only; default export.fp16.default_plan(task)).
    width_div: channel divisor of random weights (tests; real checkpoints carry their own size).
    Returns the path of manifest.json. Nothing is left behind when it raises.
    """
    t = check_args(task, res, precision, flavor, max_batch, opset, ckpt, random_weights, variant)
    from export.fp16 import default_plan, load_plan, validate_plan

    if precision == "fp16":
        if plan is None:
            plan = default_plan(task)
        elif isinstance(plan, dict):
            plan = validate_plan(plan, task)
        else:
            plan = load_plan(plan, task)
    elif plan is not None:
        raise SgexError("--plan only applies to --precision fp16")

    out = Path(out)
    task_dir = out / task
    old = Manifest.load(task_dir, task=task) if (task_dir / MANIFEST_NAME).exists() else None

    ck, variant_name = _load(task, ckpt, random_weights, seed, variant, width_div)
    if ck.random and ckpt:
        log.warning("%s holds RANDOM weights (sgex random checkpoint, seed %s): the exported graphs "
                    "output noise", ckpt, ck.seed)
    from export.checkpoint import build_model

    model = build_model(ck, task)
    if flavor == "plugin":
        model.set_modconv_impl("plugin")
    versions = _versions(opset)
    new = Manifest.new(
        task=task, variant=variant_name, precision=precision, flavor=flavor,
        noise="explicit" if t.noise == "random" else "zero", style_dim=model.style_dim,
        n_latent=N_LATENT, inputs=manifest_inputs(task, model.style_dim),
        checkpoint={"file": os.path.basename(ck.path) if ck.path else None, "sha256": ck.sha256,
                    "random": bool(ck.random), "seed": ck.seed},
        versions=versions)
    if precision == "fp16":
        new.data["plan"] = {"source": plan.get("source"), "rules": plan["rules"],
                            "graphs": plan["graphs"]}
    if old is not None:
        why = old.compatible(new)
        if why:
            raise SgexError(f"{task_dir} already holds a different export ({why}); use another --out "
                            f"or remove it")

    jobs = []  # (key, graph, side)
    if "style" in t.graphs:
        reuse = False
        if old is not None and "style" in old.graphs:
            try:
                old.verify(task_dir, ["style"])
                reuse = True
            except SgexError as e:
                log.info("re-exporting the style graph: %s", e)
        if not reuse:
            jobs.append(("style", "style", None))
    bucket_graph = t.graphs[-1]
    jobs.append((graph_key(bucket_graph, res), bucket_graph, res))
    extra = 1 if t.editing else 0
    stages = _Stages(len(jobs) + extra, progress)

    created_out, created_task = not out.exists(), not task_dir.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage_dir = Path(tempfile.mkdtemp(prefix=f".sgex-export-{task}-", dir=out))
    try:
        for key, graph, side in jobs:
            label = f"exporting {graph_key(graph, side) if side else 'style@256'} ({precision}, {flavor})"
            with stages(label):
                rel = graph_file(graph, side)
                entry = export_graph(model, task, graph, stage_dir / rel, side=side, max_batch=max_batch,
                                     opset=opset, flavor=flavor, precision=precision, plan=plan)
                entry = {"file": rel, "sha256": sha256_file(stage_dir / rel), **entry}
                new.graphs[key] = entry
            mb = (stage_dir / rel).stat().st_size / 2**20
            log.info("%s: %s (%.1f MiB, %d nodes)", key, rel, mb, entry["nodes"])
        if t.editing:
            with stages("writing editing_w.npy"):
                import io

                import numpy as np

                if ck.editing_w is None:
                    raise SgexError(f"{task} checkpoint has no editing_w")
                buf = io.BytesIO()
                np.save(buf, ck.editing_w[0:1].numpy().astype(np.float32))
                atomic_write_bytes(stage_dir / "editing_w.npy", buf.getvalue())
                new.files["editing_w.npy"] = sha256_file(stage_dir / "editing_w.npy")
        merged = old.merge(new) if old is not None else new
        # commit: move each staged file into place (same filesystem: atomic renames), then the manifest
        task_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted(p for p in stage_dir.rglob("*") if p.is_file()):
            dst = task_dir / f.relative_to(stage_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dst)
        path = merged.save(task_dir)
    except BaseException:
        shutil.rmtree(stage_dir, ignore_errors=True)
        if created_out:
            shutil.rmtree(out, ignore_errors=True)
        elif created_task:
            shutil.rmtree(task_dir, ignore_errors=True)
        raise
    shutil.rmtree(stage_dir, ignore_errors=True)
    return path


def ort_session(path: str | os.PathLike, flavor: str | None = None, threads: int | None = None):
    """An ONNX Runtime CPU session for an exported graph; the plugin flavor (read from the file's
    sgex.flavor property when not given) registers the FusedModulatedConv2d op."""
    import onnxruntime as ort

    if flavor is None:
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        flavor = {p.key: p.value for p in m.metadata_props}.get("sgex.flavor", "portable")
    if flavor == "plugin":
        from kernels.onnx_op import ort_session_options

        so = ort_session_options()
    else:
        so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

"""TensorRT engines: one strongly typed engine per exported graph and bucket, built with Polygraphy.

Precision is the ONNX graph's own: TensorRT 11 builds strongly typed networks only, so FP16 comes
from the FP16 ONNX that export.onnx writes from the precision plan (its FP32 islands stay FP32),
and no builder precision flag is set. TensorRT 10 (>= 10.9) builds the same graph strongly typed
too (the STRONGLY_TYPED network flag; TensorRT 11 accepts or drops it, typing is unconditional).

TF32: off. Polygraphy's CreateConfig leaves TensorRT's TF32 flag cleared unless asked, and sgex
asks explicitly (`TF32 = False`) so that no Polygraphy default decides it: the FP32 layers of an
sgex graph are FP32 on purpose (the precision plan's islands in FP16 graphs, and `--precision
fp32` engines, which are the accuracy reference), and TF32's 10-bit mantissa would change them
by about 1e-3 relative. The fused plugin computes its FP32 path with 3xTF32 (FP32 accuracy)
either way.

Each engine gets one optimization profile derived from the bucket table (runtime/buckets.py;
a bucket is named by its output side R): min = batch 1 at x1 8x8 (the smallest size the graphs
support: f is 1x1; tested on ONNX Runtime), opt = `opt_batch` at x1 R/4 x R/4, max = the bucket's
max batch at R/4 x R/4 (opt = max: the official crops fill their bucket); every input's dims
follow from (batch, height, width): x1/x/x2 [B, C, H, W],
noise_j [B, 1, h_j, w_j] with (h_j, w_j) = runtime.tasks.noise_shapes(H, W)[j], and the batch-only
inputs wplus/editing_w/z. The style graph (fixed 256x256) uses `Bucket.style_profile` with the
largest max batch of the export.

Timing cache: TensorRT's tactic timings are valid for one TensorRT version on one GPU model, so
the cache file is named by `timing_cache_key(version, gpu, compute capability)`, e.g.
`trt-10.9.0.34_nvidia-h100-80gb-hbm3_sm90.cache`, and lives in `<task dir>/trt-timing-cache/` by
default (or in a user directory, or a user file used as is). Polygraphy loads it with
ignore_mismatch=False (a cache of another device would be rejected, hence one file per key) and
merges new timings into it under a file lock, so concurrent builds can share it.

`sgex-export ... --engine` builds after the ONNX export (`add_engine_args` + `maybe_build`) and
keeps every engine that is still current (same ONNX graph, TensorRT version, GPU and profile), so
adding a bucket builds only the new bucket's engine (and the style engine when the largest max
batch grew).

Nothing in the TensorRT path was run on a machine with TensorRT (see README). The pure functions
are unit-tested on CPU, and `build_engines`' bookkeeping (profiles, strong typing, workspace,
timing cache, plugin kind, manifest entries, keeping current engines) against a fake Polygraphy.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import logging
import re
from pathlib import Path

from runtime.buckets import Bucket
from runtime.errors import SgexError, require
from runtime.manifest import Manifest, atomic_write_bytes, parse_graph_key, sha256_file
from runtime.tasks import noise_shapes

log = logging.getLogger(__name__)

ENGINE_SUFFIX = ".engine"
TIMING_CACHE_DIR = "trt-timing-cache"  # under the task directory unless the user names a path
AUTO, NONE = "auto", "none"
IMAGE_INPUTS = ("x1", "x", "x2")  # [B, C, H, W]; H, W from the profile
NOISE_INPUT = re.compile(r"noise_(\d+)")  # [B, 1, h_j, w_j]
PLUGIN_MODES = ("aot", "jit")
TF32 = False  # FP32 layers stay FP32 (module docstring)
_LEVELS = ("min", "opt", "max")


# -- pure functions (no TensorRT) ---------------------------------------------------------------
def graph_bucket(manifest: Manifest, key: str) -> Bucket:
    """The bucket whose profile an engine of graph `key` gets. The style graph has no bucket: it
    serves every bucket of the export, so it takes the largest max batch among them."""
    b = manifest.graph(key).get("bucket")
    if b is not None:
        return Bucket(int(b["side"]), int(b["max_batch"]))
    buckets = manifest.buckets()
    if not buckets:
        raise SgexError(f"task {manifest.task!r}: no bucket graphs exported, so the style graph has "
                        f"no batch range; export a bucket first")
    return Bucket(max(x.side for x in buckets), max(x.max_batch for x in buckets))


def profile_shapes(graph: dict, bucket: Bucket, opt_batch: int = 1) -> dict[str, dict[str, tuple]]:
    """min/opt/max shape of every input of a manifest graph entry for `bucket`.

    graph: {"bucket": {...} | None, "inputs": [{"name", "shape": [int | str, ...]}, ...]}; symbolic
    dims are the batch (dim 0) and, for image and noise inputs, the spatial dims. Returns
    {name: {"min": tuple, "opt": tuple, "max": tuple}}. SgexError when a manifest dim contradicts
    the bucket table (a fixed dim of another value, or a symbolic dim sgex does not vary)."""
    style = graph.get("bucket") is None
    prof = bucket.style_profile(opt_batch) if style else bucket.profile(opt_batch)
    out = {}
    for inp in graph["inputs"]:
        name, decl = inp["name"], list(inp["shape"])
        out[name] = {lvl: _input_shape(name, decl, *prof[lvl]) for lvl in _LEVELS}
    return out


def _input_shape(name: str, decl: list, batch: int, height: int, width: int) -> tuple[int, ...]:
    """One input's shape at one profile point; None in `want` = take the manifest's fixed dim."""
    m = NOISE_INPUT.fullmatch(name)
    if name in IMAGE_INPUTS:
        want = [batch, None, height, width]
    elif m:
        j = int(m.group(1))
        shapes = noise_shapes(height, width)
        if j >= len(shapes):
            raise SgexError(f"graph input {name}: there are only {len(shapes)} noise inputs")
        want = [batch, 1, *shapes[j]]
    else:
        want = [batch] + [None] * (len(decl) - 1)
    if len(decl) != len(want):
        raise SgexError(f"graph input {name} has {len(decl)} dims in the manifest; sgex expects {len(want)}")
    shape = []
    for d, (got, w) in enumerate(zip(decl, want)):
        if w is None:
            if not isinstance(got, int):
                raise SgexError(f"graph input {name} dim {d} is symbolic ({got!r}) in the manifest, "
                                f"but only batch/height/width vary in sgex; re-export the task")
            shape.append(got)
        else:
            if isinstance(got, int) and got != w:
                raise SgexError(f"graph input {name} dim {d} is fixed to {got} in the manifest, but the "
                                f"bucket profile needs {w}; re-export the task")
            shape.append(w)
    return tuple(shape)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def timing_cache_key(tensorrt_version: str, gpu: str, compute_capability: str) -> str:
    """File-name-safe key of a timing cache: TensorRT version + GPU name + compute capability."""
    cc = compute_capability.replace(".", "")
    return f"trt-{_slug(tensorrt_version)}_{_slug(gpu)}_sm{_slug(cc)}"


def timing_cache_path(task_dir, timing_cache: str | None, key: str) -> Path | None:
    """Where the timing cache lives. "auto" (or None): <task_dir>/trt-timing-cache/<key>.cache;
    "none": no cache; an existing directory: <dir>/<key>.cache; anything else: that file as is
    (the user keeps it to one TensorRT version and GPU)."""
    if timing_cache is None or timing_cache == AUTO:
        return Path(task_dir) / TIMING_CACHE_DIR / f"{key}.cache"
    if timing_cache == NONE:
        return None
    p = Path(timing_cache)
    if p.is_dir():
        return p / f"{key}.cache"
    return p


def engine_file(graph_file: str) -> str:
    """The engine's path in the task directory: the ONNX graph's with the .engine suffix."""
    return str(Path(graph_file).with_suffix(ENGINE_SUFFIX).as_posix())


def engine_entry(*, graph: dict, data: bytes, tensorrt: str, gpu: str, compute_capability: str,
                 profile: dict, precision: str, plugin: str | None, workspace_gb: float | None) -> dict:
    """The manifest "engines" entry of one built engine (what the trt backend checks)."""
    if plugin not in (None, *PLUGIN_MODES):
        raise ValueError(f"plugin must be one of {PLUGIN_MODES} or None, got {plugin!r}")
    return {
        "file": engine_file(graph["file"]),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "onnx_sha256": graph["sha256"],
        "tensorrt": tensorrt,
        "gpu": gpu,
        "compute_capability": compute_capability,
        "profile": {n: {lvl: list(s[lvl]) for lvl in _LEVELS} for n, s in profile.items()},
        "precision": precision,
        "strongly_typed": True,
        "plugin": plugin,
        "workspace_gb": workspace_gb,
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def select_graphs(manifest: Manifest, graphs=None) -> list[str]:
    """Graph keys to build: all (None), or the named keys ("style", "synth@128") / graph names
    ("synth" = every bucket)."""
    keys = list(manifest.graphs)
    if graphs is None:
        return keys
    picked = []
    for g in graphs:
        match = [k for k in keys if k == g or parse_graph_key(k)[0] == g]
        if not match:
            raise SgexError(f"task {manifest.task!r} has no exported graph {g!r} (exported: {', '.join(keys)})")
        picked.extend(k for k in match if k not in picked)
    return picked


# -- TensorRT (lazy) ---------------------------------------------------------------------------
def require_engine_deps():
    """(tensorrt, polygraphy.backend.trt) or MissingDependency naming the trt extra."""
    from runtime.backends.trt import import_cudart, import_tensorrt

    trt = import_tensorrt()
    import_cudart()
    poly_trt = require("polygraphy.backend.trt", "trt", "Polygraphy")
    return trt, poly_trt


def _register_plugin() -> None:
    """Register sgex::FusedModulatedConv2d with TensorRT before parsing a plugin-flavor graph."""
    from kernels import trt_plugin

    try:
        trt_plugin.register()
    except trt_plugin.PluginUnavailable as e:
        raise SgexError(str(e)) from None
    log.info("TensorRT plugin %s registered", trt_plugin.PLUGIN_ID)


def _require_jit_plugin() -> None:
    """A JIT plugin (aot=0) runs its kernel through torch while TensorRT times tactics."""
    from kernels import trt_plugin

    try:
        trt_plugin.require_jit_runtime()
    except trt_plugin.PluginUnavailable as e:
        raise SgexError(str(e)) from None


def plugin_mode(aot_values) -> str | None:
    """The engine's plugin kind from the `aot` attributes of its FusedModulatedConv2d nodes:
    None (no node), "aot" (all aot=1: the kernel is baked into the engine), "jit" (any aot=0: the
    engine calls back into Python at run time)."""
    values = list(aot_values)
    if not values:
        return None
    return "aot" if all(int(v) == 1 for v in values) else "jit"


def _onnx_aot_values(onnx_path: Path) -> list[int]:
    """`aot` of every FusedModulatedConv2d node (plugin flavor only; reads the graph with onnx)."""
    onnx = require("onnx", "onnx", "onnx (to read the plugin nodes of a plugin-flavor graph)")
    from kernels.onnx_op import DOMAIN, OP_TYPE

    model = onnx.load(str(onnx_path), load_external_data=False)
    out = []
    for node in model.graph.node:
        if node.op_type == OP_TYPE and node.domain == DOMAIN:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            out.append(int(attrs.get("aot", 0)))  # TensorRT's parser treats a missing aot as 0
    return out


def _count_plugin_layers(trt, network) -> int:
    kinds = {getattr(trt.LayerType, n) for n in ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN") if hasattr(trt.LayerType, n)}
    return sum(network.get_layer(i).type in kinds for i in range(network.num_layers))


def engine_is_current(task_dir, entry: dict | None, graph: dict, profile: dict, *, tensorrt: str,
                      gpu: str, compute_capability: str) -> bool:
    """True when `entry` is exactly what a build now would produce: same ONNX graph, TensorRT
    version, GPU and optimization profile, and its file is intact (so it can be kept)."""
    if not entry:
        return False
    want = {n: {lvl: list(s[lvl]) for lvl in _LEVELS} for n, s in profile.items()}
    same = (entry.get("onnx_sha256") == graph["sha256"] and entry.get("tensorrt") == tensorrt
            and entry.get("gpu") == gpu and entry.get("compute_capability") == compute_capability
            and entry.get("profile") == want)
    path = Path(task_dir) / entry["file"]
    return same and path.is_file() and sha256_file(path) == entry["sha256"]


def build_engines(task_dir, workspace_gb: float | None = None, timing_cache: str | None = AUTO,
                  graphs=None, opt_batch: int = 1, force: bool = False) -> Manifest:
    """Build `<graph>.engine` next to each selected ONNX graph of an exported task directory and
    record it in manifest.json ("engines"). Returns the updated manifest.

    workspace_gb: TensorRT workspace pool limit (None: TensorRT's default, the device memory).
    timing_cache: "auto" | "none" | a directory | a file (see `timing_cache_path`).
    graphs: None = every graph, or keys/names as in `select_graphs`. opt_batch: the profile's opt batch.
    force: rebuild engines that are current (`engine_is_current`); by default they are kept, so
    adding a bucket with `sgex-export --res N --engine` builds only what changed."""
    trt, poly_trt = require_engine_deps()
    from runtime.backends.trt import device_identity

    task_dir = Path(task_dir)
    manifest = Manifest.load(task_dir)
    keys = select_graphs(manifest, graphs)
    if workspace_gb is not None and workspace_gb <= 0:
        raise SgexError(f"--workspace-gb must be positive, got {workspace_gb}")
    ident = device_identity(0)
    version = trt.__version__
    cache = timing_cache_path(task_dir, timing_cache, timing_cache_key(version, ident.gpu, ident.compute_capability))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
    if manifest.flavor == "plugin":
        _register_plugin()
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    log.info("building %d TensorRT engine(s) with TensorRT %s on %s (sm %s), timing cache %s",
             len(keys), version, ident.gpu, ident.compute_capability, cache or "off")

    for key in keys:
        graph = manifest.graph(key)
        onnx_path = task_dir / graph["file"]
        if not onnx_path.is_file() or sha256_file(onnx_path) != graph["sha256"]:
            raise SgexError(f"{onnx_path}: missing or not the graph the manifest names; re-export the task")
        shapes = profile_shapes(graph, graph_bucket(manifest, key), opt_batch)
        if not force and engine_is_current(task_dir, manifest.engines.get(key), graph, shapes, tensorrt=version,
                                           gpu=ident.gpu, compute_capability=ident.compute_capability):
            log.info("keeping %s: its engine is current", key)
            continue
        profile = poly_trt.Profile()
        for name, s in shapes.items():
            profile.add(name, min=s["min"], opt=s["opt"], max=s["max"])
        plugin = plugin_mode(_onnx_aot_values(onnx_path)) if manifest.flavor == "plugin" else None
        if plugin == "jit":
            _require_jit_plugin()
        network = poly_trt.network_from_onnx_path(str(onnx_path), strongly_typed=strongly_typed or None)
        n_plugins = _count_plugin_layers(trt, network[1])
        if bool(n_plugins) != (plugin is not None):
            raise SgexError(f"{onnx_path}: TensorRT parsed {n_plugins} plugin layers, the manifest "
                            f"(flavor {manifest.flavor!r}) implies {'some' if plugin else 'none'}; "
                            f"re-export the task")
        limits = {trt.MemoryPoolType.WORKSPACE: int(workspace_gb * (1 << 30))} if workspace_gb else None
        config = poly_trt.CreateConfig(
            profiles=[profile], memory_pool_limits=limits, tf32=TF32,
            load_timing_cache=str(cache) if cache is not None and cache.is_file() else None)
        log.info("building %s (%s, %d plugin layers)", key, manifest.precision, n_plugins)
        data = bytes(poly_trt.engine_bytes_from_network(
            network, config=config, save_timing_cache=str(cache) if cache is not None else None))
        entry = engine_entry(graph=graph, data=data, tensorrt=version, gpu=ident.gpu,
                             compute_capability=ident.compute_capability, profile=shapes,
                             precision=manifest.precision, plugin=plugin,
                             workspace_gb=workspace_gb)
        atomic_write_bytes(task_dir / entry["file"], data)
        manifest.engines[key] = entry
        manifest.save(task_dir)  # after every engine, so an interrupted build keeps what it finished
        log.info("wrote %s (%.1f MB)", task_dir / entry["file"], len(data) / 1e6)
    return manifest


# -- CLI helpers for sgex-export ------------------------------------------------------------------
class _EngineFlag(argparse.Action):
    """--engine: checks for TensorRT at parse time, so a missing install fails before the export
    (one line, exit 2, as every sgex CLI error)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            require_engine_deps()
        except SgexError as e:
            parser.exit(2, f"{parser.prog}: error: {option_string}: {e}\n")
        setattr(namespace, self.dest, True)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """--engine, --workspace-gb, --timing-cache, --opt-batch, --rebuild-engines on an sgex-export parser."""
    g = parser.add_argument_group("TensorRT engines (needs the trt extra)")
    g.add_argument("--engine", action=_EngineFlag,
                   help="after the ONNX export, build a strongly typed TensorRT engine per graph "
                        "and bucket (FP16 comes from --precision fp16)")
    g.add_argument("--workspace-gb", type=float, default=None, metavar="GB",
                   help="TensorRT workspace limit in GiB (default: TensorRT's, the device memory)")
    g.add_argument("--timing-cache", default=AUTO, metavar="PATH",
                   help="tactic timing cache: 'auto' (<task dir>/trt-timing-cache/, one file per "
                        "TensorRT version and GPU), 'none', a directory, or a file")
    g.add_argument("--opt-batch", type=int, default=1, metavar="N",
                   help="batch size TensorRT optimizes for (profile opt; default 1)")
    g.add_argument("--rebuild-engines", action="store_true",
                   help="rebuild every engine (default: keep engines that match this TensorRT, GPU, "
                        "graph and profile)")


def maybe_build(args: argparse.Namespace, task_dir) -> Manifest | None:
    """Build the engines of `task_dir` when --engine was given; None otherwise."""
    if not getattr(args, "engine", False):
        return None
    return build_engines(task_dir, workspace_gb=args.workspace_gb, timing_cache=args.timing_cache,
                         opt_batch=args.opt_batch, force=args.rebuild_engines)

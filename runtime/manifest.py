"""manifest.json: the sidecar of an exported task directory (pure json/hashlib; no torch).

Layout of one task directory (written by `export.onnx.export_task`, read by `runtime.Engine`):

    <task>/manifest.json
    <task>/style/style.onnx              RGB tasks: fixed 256x256, dynamic batch
    <task>/<res>/synth.onnx              or translate.onnx; dynamic batch, height, width
    <task>/<res>/<graph>.engine          TensorRT, optional (export/engine.py)
    <task>/editing_w.npy                 edit task only: float32 [1, 18, D]

The manifest names every file with its sha256; the runtime refuses a directory whose files do not
match (`verify`), a manifest of another format or version, or one of another task. Graph keys are
"style" and "<graph>@<res>" ("synth@1024", "translate@512"), where res is the bucket's output side
(runtime/buckets.py: x1 sides multiples of 8 up to res/4). Version 1 named buckets by their largest
input side; such a manifest is refused with a request to re-export.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from runtime.buckets import Bucket, check_side
from runtime.errors import SgexError
from runtime.tasks import ALIGNED_SIZE, N_LATENT, N_NOISE, STYLE_DIM, TASKS, WIDTH_DIVS, Task

FORMAT = "sgex-manifest"
VERSION = 2  # 2: buckets named by the output side (1: by the input side)
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16")
FLAVORS = ("portable", "plugin")

# The schema, in one place. Top-level fields: REQUIRED and OPTIONAL, nothing else. Inside graph,
# engine and checkpoint entries the listed fields are required (REQ) or type-checked when present;
# entries may carry more (engines record build facts). A type given as a tuple allows each.
_INT, _STR, _NONE = (int,), (str,), (type(None),)
REQUIRED = {"format": _STR, "version": _INT, "task": _STR, "variant": _STR, "precision": _STR,
            "flavor": _STR, "noise": _STR, "style_dim": _INT, "n_latent": _INT, "inputs": (dict,),
            "checkpoint": (dict,), "graphs": (dict,), "files": (dict,), "engines": (dict,),
            "versions": (dict,), "created": _STR}
# Optional top-level field: the OpenVINO BF16 accuracy gate written by `sgex-calib --bf16`
# (calib/bf16.py) and read by runtime/backends/openvino.py.
BF16_GATE = "openvino_bf16"
OPTIONAL = {"plan": (dict,),  # fp16 exports: the precision plan the graphs were built with
            BF16_GATE: (dict,)}
GRAPH_FIELDS = {"file": _STR, "sha256": _STR, "inputs": (list,), "outputs": (list,),
                "graph": _STR, "bucket": (dict,) + _NONE, "dims": (dict,), "precision": _STR,
                "flavor": _STR, "opset": _INT, "nodes": _INT}
GRAPH_REQUIRED = ("file", "sha256", "inputs", "outputs")
ENGINE_FIELDS = {"file": _STR, "sha256": _STR, "onnx_sha256": _STR, "tensorrt": _STR, "gpu": _STR,
                 "compute_capability": _STR, "precision": _STR, "plugin": _STR + _NONE, "profile": (dict,)}
ENGINE_REQUIRED = ("file", "sha256")
CHECKPOINT_FIELDS = {"file": _STR + _NONE, "sha256": _STR + _NONE, "random": (bool,), "seed": _INT + _NONE}
IO_FIELDS = {"name": _STR, "dtype": _STR, "shape": (list,)}
NOISE = {"random": "explicit", "zero": "zero"}  # task table noise -> manifest noise

__all__ = [
    "Manifest", "FORMAT", "VERSION", "MANIFEST_NAME", "BF16_GATE", "OPTIONAL", "sha256_file", "graph_key", "parse_graph_key",
    "graph_io", "check_schema",
    "atomic_write_bytes", "atomic_write_text",
]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (graphs reach ~1 GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def graph_key(graph: str, side: int | None) -> str:
    """"style" (no bucket) or "<graph>@<side>" (side: the bucket's output side)."""
    return graph if side is None else f"{graph}@{side}"


def parse_graph_key(key: str) -> tuple[str, int | None]:
    if "@" not in key:
        return key, None
    name, side = key.split("@", 1)
    if not side.isdigit():
        raise SgexError(f"manifest: bad graph key {key!r} (expected '<graph>@<side>')")
    return name, int(side)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through runtime.io.atomic_output (temp file beside it, fsync, rename;
    never a partial file), creating the parent folder."""
    from runtime.io import atomic_output, write_all

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        write_all(tmp, data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _safe_relpath(rel: str, what: str) -> str:
    """Manifest file entries are relative paths inside the task directory."""
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        raise SgexError(f"manifest: {what} has an unsafe file path {rel!r}")
    return rel


def graph_io(spec: Task, graph: str, style_dim: int) -> tuple[dict[str, list], dict[str, list]]:
    """(inputs, outputs) of one exported graph of a task, in order: name -> shape, where an int is
    a fixed dimension and None a dynamic one (batch, height, width). The manifest must match."""
    d = style_dim
    if graph == "style":
        return {"x2": [None, 3, ALIGNED_SIZE, ALIGNED_SIZE]}, {"wplus": [None, N_LATENT, d]}
    if graph == "synth":
        ins = {"x1": [None, 3, None, None], "wplus": [None, N_LATENT, d]}
        if spec.editing:
            ins["editing_w"] = [None, N_LATENT, d]
    else:
        ins = {"x": [None, spec.in_channels, None, None], "z": [None, d]}
    if spec.noise == "random":
        ins.update({f"noise_{j}": [None, 1, None, None] for j in range(N_NOISE)})
    return ins, {"y": [None, 3, None, None]}


def _is(value, types) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # True is an int to Python, not to a manifest
    return isinstance(value, types)


def _typed(where: str, entry: dict, fields: dict, required=()) -> None:
    for name in required:
        if name not in entry:
            raise SgexError(f"{where} lacks {name!r}")
    for name, types in fields.items():
        if name in entry and not _is(entry[name], types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            value = entry[name]
            shown = f" {value!r}"[:40] if isinstance(value, (str, int, float, type(None))) else ""
            raise SgexError(f"{where}.{name} must be {want}, got {type(value).__name__}{shown}")


def _sha(where: str, value: str | None) -> None:
    if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
        raise SgexError(f"{where} is not a sha256 (64 lowercase hex digits): {value!r}")


def _file_entry(where: str, entry, fields: dict, required, what: str) -> None:
    """A graph or engine entry: an object with typed fields, a safe file path and a sha256."""
    if not isinstance(entry, dict):
        raise SgexError(f"{where} must be an object, got {type(entry).__name__}")
    _typed(where, entry, fields, required)
    _safe_relpath(entry["file"], what)
    _sha(f"{where}.sha256", entry["sha256"])


def _check_io(where: str, got: list, want: dict[str, list]) -> None:
    for i, t in enumerate(got):
        if not isinstance(t, dict):
            raise SgexError(f"{where}[{i}] must be an object, got {type(t).__name__}")
        _typed(f"{where}[{i}]", t, IO_FIELDS, ("name",))
    names = [t["name"] for t in got]
    if names != list(want):
        raise SgexError(f"{where} are {names}, but this task's graph has {list(want)}")
    for t in got:
        shape = t.get("shape")
        if shape is None:
            continue
        exp = want[t["name"]]
        if len(shape) != len(exp) or any(e is not None and s != e for s, e in zip(shape, exp)):
            shown = [("*" if e is None else e) for e in exp]
            raise SgexError(f"{where} {t['name']}: shape {shape} does not fit this task ({shown})")


def check_schema(d, source: str = "manifest") -> None:
    """Check a parsed manifest.json: every field's type, then the manifest against the task table
    (runtime/tasks.py): variant, noise, style dim, graph names, each graph's bucket and the names
    and fixed dimensions of its inputs and outputs, safe relative file paths, sha256 strings,
    engines of existing graphs. SgexError naming the field; a manifest that passes can be
    indexed without further checks."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        fmt = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise SgexError(f"{source}: not an sgex manifest (format {fmt!r}, expected {FORMAT!r})")
    if d.get("version") == 1:
        raise SgexError(f"{source}: an export of the old layout (manifest version 1, buckets named by "
                        f"the input side); re-export it with sgex-export (--res is now the output side)")
    if d.get("version") != VERSION or not _is(d.get("version"), _INT):
        raise SgexError(f"{source}: manifest version {d.get('version')!r} is not supported "
                        f"(this sgex reads version {VERSION})")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise SgexError(f"{source}: manifest lacks {', '.join(missing)}")
    unknown = [k for k in d if k not in REQUIRED and k not in OPTIONAL]
    if unknown:
        raise SgexError(f"{source}: unknown manifest field {unknown[0]!r} (optional fields: "
                        f"{', '.join(OPTIONAL) or 'none'})")
    _typed(source, d, {**REQUIRED, **OPTIONAL})
    if d["task"] not in TASKS:
        raise SgexError(f"{source}: unknown task {d['task']!r}")
    spec = TASKS[d["task"]]
    if d["variant"] not in [v.name for v in spec.variants]:
        raise SgexError(f"{source}: variant {d['variant']!r} is not a variant of task {spec.name!r} "
                        f"({', '.join(v.name for v in spec.variants)})")
    if d["precision"] not in PRECISIONS:
        raise SgexError(f"{source}: unknown precision {d['precision']!r}")
    if d["flavor"] not in FLAVORS:
        raise SgexError(f"{source}: unknown flavor {d['flavor']!r}")
    if d["noise"] != NOISE[spec.noise]:
        raise SgexError(f"{source}: noise {d['noise']!r} does not fit task {spec.name!r} ({NOISE[spec.noise]!r})")
    dims = sorted(STYLE_DIM // w for w in WIDTH_DIVS)
    if d["style_dim"] not in dims:
        raise SgexError(f"{source}: style_dim {d['style_dim']} is not one of {dims}")
    if d["n_latent"] != N_LATENT:
        raise SgexError(f"{source}: n_latent {d['n_latent']} is not {N_LATENT}")
    _typed(f"{source}: checkpoint", d["checkpoint"], CHECKPOINT_FIELDS, ("sha256", "random"))
    _sha(f"{source}: checkpoint.sha256", d["checkpoint"]["sha256"])
    for key, g in d["graphs"].items():
        where = f"{source}: graphs[{key!r}]"
        name, side = parse_graph_key(key)
        if name not in spec.graphs or (name == "style") != (side is None):
            shown = ", ".join("style" if n == "style" else f"{n}@<side>" for n in spec.graphs)
            raise SgexError(f"{where}: task {spec.name!r} has no such graph (its graphs: {shown})")
        _file_entry(where, g, GRAPH_FIELDS, GRAPH_REQUIRED, f"graph {key!r}")
        if g.get("graph", name) != name:
            raise SgexError(f"{where}.graph is {g['graph']!r}, not {name!r}")
        b = g.get("bucket")
        if side is not None:
            if b is None:
                raise SgexError(f"{where} lacks its bucket {{side, max_batch}}")
            _typed(f"{where}.bucket", b, {"side": _INT, "max_batch": _INT}, ("side", "max_batch"))
            if b["side"] != side:
                raise SgexError(f"{where}.bucket.side is {b['side']}, but the key says {side}")
            try:
                check_side(side, what=f"{where}: the bucket side")
            except ValueError as e:
                raise SgexError(str(e)) from None
            if b["max_batch"] < 1:
                raise SgexError(f"{where}.bucket.max_batch must be >= 1, got {b['max_batch']}")
        elif b is not None:
            raise SgexError(f"{where}.bucket must be null (the style graph has no bucket)")
        want_in, want_out = graph_io(spec, name, d["style_dim"])
        _check_io(f"{where}.inputs", g["inputs"], want_in)
        _check_io(f"{where}.outputs", g["outputs"], want_out)
    for rel, sha in d["files"].items():
        _safe_relpath(rel, "files")
        if not _is(sha, _STR):
            raise SgexError(f"{source}: files[{rel!r}] must be a sha256 string, got {type(sha).__name__}")
        _sha(f"{source}: files[{rel!r}]", sha)
    for key, e in d["engines"].items():
        where = f"{source}: engines[{key!r}]"
        if key not in d["graphs"]:
            raise SgexError(f"{where}: an engine of no graph in the manifest")
        _file_entry(where, e, ENGINE_FIELDS, ENGINE_REQUIRED, f"engine {key!r}")


@dataclass
class Manifest:
    """The parsed manifest.json of one task directory; `data` is the JSON object itself.

    Use `Manifest.load(dir)` to read (validates format/version/fields), `verify(dir)` to check file
    hashes, `save(dir)` to write atomically, `merge(other)` to add buckets to an existing task."""

    data: dict = field(default_factory=dict)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def new(cls, *, task: str, variant: str, precision: str, flavor: str, noise: str, style_dim: int,
            n_latent: int, inputs: dict, checkpoint: dict, versions: dict) -> "Manifest":
        m = cls({
            "format": FORMAT, "version": VERSION, "task": task, "variant": variant,
            "precision": precision, "flavor": flavor, "noise": noise, "style_dim": style_dim,
            "n_latent": n_latent, "inputs": inputs, "checkpoint": checkpoint, "graphs": {},
            "files": {}, "engines": {}, "versions": versions,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
        m.validate()
        return m

    @classmethod
    def from_dict(cls, data: dict, source: str = "manifest") -> "Manifest":
        m = cls(copy.deepcopy(data))
        m.validate(source)
        return m

    @classmethod
    def load(cls, directory: str | os.PathLike, task: str | None = None) -> "Manifest":
        """Read <directory>/manifest.json. SgexError when it is missing, not JSON, of another format
        or version, incomplete, or (with `task`) of another task."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise SgexError(f"no {MANIFEST_NAME} in {directory} (export the task first with sgex-export)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SgexError(f"{path}: not a valid JSON manifest ({e})") from None
        m = cls.from_dict(data, str(path))
        if task is not None and m.task != task:
            raise SgexError(f"{path} is a manifest of task {m.task!r}, not {task!r}")
        return m

    def validate(self, source: str = "manifest") -> None:
        """The one schema check (see `check_schema`); SgexError naming the offending field."""
        check_schema(self.data, source)

    # -- accessors ------------------------------------------------------------------------------
    task = property(lambda self: self.data["task"])
    variant = property(lambda self: self.data["variant"])
    precision = property(lambda self: self.data["precision"])
    flavor = property(lambda self: self.data["flavor"])
    noise = property(lambda self: self.data["noise"])
    style_dim = property(lambda self: self.data["style_dim"])
    n_latent = property(lambda self: self.data["n_latent"])
    inputs = property(lambda self: self.data["inputs"])
    checkpoint = property(lambda self: self.data["checkpoint"])
    graphs = property(lambda self: self.data["graphs"])
    files = property(lambda self: self.data["files"])
    engines = property(lambda self: self.data["engines"])
    versions = property(lambda self: self.data["versions"])

    def graph(self, key: str) -> dict:
        """The graph entry for a key ("style", "synth@1024"); SgexError naming what exists."""
        try:
            return self.graphs[key]
        except KeyError:
            have = ", ".join(sorted(self.graphs)) or "none"
            raise SgexError(f"task {self.task!r} has no exported graph {key!r} (exported: {have})") from None

    def buckets(self) -> list[Bucket]:
        """Buckets with a per-bucket graph, smallest (output) side first."""
        seen: dict[int, Bucket] = {}
        for key, g in self.graphs.items():
            b = g.get("bucket")
            if b is not None:
                seen[b["side"]] = Bucket(int(b["side"]), int(b["max_batch"]))
        return [seen[s] for s in sorted(seen)]

    def bucket_graph_name(self) -> str:
        """"synth" or "translate": the per-bucket graph of this task."""
        return TASKS[self.task].graphs[-1]

    def path(self, directory: str | os.PathLike, key: str) -> Path:
        return Path(directory) / self.graph(key)["file"]

    # -- integrity ------------------------------------------------------------------------------
    def _entries(self, keys) -> list[tuple[str, str, str]]:
        """(what, relative file, expected sha256) for the graphs/engines in keys (None: every file)."""
        out = []
        for k, g in self.graphs.items():
            if keys is None or k in keys:
                out.append((f"graph {k}", g["file"], g["sha256"]))
        for k, e in self.engines.items():
            if keys is None or k in keys:
                out.append((f"engine {k}", e["file"], e["sha256"]))
        if keys is None:
            out.extend(("file", rel, sha) for rel, sha in self.files.items())
        return out

    def verify(self, directory: str | os.PathLike, keys=None) -> None:
        """Check the sha256 of every listed file (or of the graphs/engines named in `keys`).
        SgexError naming the first missing or modified file."""
        if keys is not None:
            keys = [keys] if isinstance(keys, str) else list(keys)
            for k in keys:
                if k not in self.graphs and k not in self.engines:
                    self.graph(k)
        for what, rel, sha in self._entries(keys):
            p = Path(directory) / rel
            if not p.is_file():
                raise SgexError(f"{p}: missing ({what} of manifest for task {self.task!r})")
            if sha256_file(p) != sha:
                raise SgexError(f"{p}: sha256 does not match the manifest ({what}); the file was "
                                f"modified or belongs to another export")

    def read_verified(self, directory: str | os.PathLike, key: str, kind: str = "graph") -> bytes:
        """The bytes of the graph, engine or file `key` (kind "graph" | "engine" | "file"), read
        once and checked against the manifest's sha256: a caller that loads these bytes runs
        exactly what was hashed (a file changed after `verify` is refused here, not run)."""
        if kind == "graph":
            rel, sha = self.graph(key)["file"], self.graph(key)["sha256"]
        elif kind == "engine":
            if key not in self.engines:
                have = ", ".join(sorted(self.engines)) or "none"
                raise SgexError(f"task {self.task!r} has no TensorRT engine {key!r} (engines: {have})")
            rel, sha = self.engines[key]["file"], self.engines[key]["sha256"]
        elif kind == "file":
            if key not in self.files:
                raise SgexError(f"the manifest of task {self.task!r} lists no file {key!r}")
            rel, sha = key, self.files[key]
        else:
            raise ValueError(f"kind must be graph, engine or file, got {kind!r}")
        p = Path(directory) / rel
        if not p.is_file():
            raise SgexError(f"{p}: missing ({kind} {key} of manifest for task {self.task!r})")
        data = p.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise SgexError(f"{p}: sha256 does not match the manifest ({kind} {key}); the file was "
                            f"modified or belongs to another export")
        return data

    # -- writing --------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write <directory>/manifest.json atomically."""
        self.validate()
        path = Path(directory) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        return path

    def compatible(self, other: "Manifest") -> str | None:
        """Why `other` cannot be merged into this one (None when it can)."""
        mine, theirs = self.data, other.data
        for f in ("task", "variant", "precision", "flavor", "noise", "style_dim"):
            if mine[f] != theirs[f]:
                return f"{f} differs (existing {mine[f]!r}, new {theirs[f]!r})"
        a, b = mine["checkpoint"], theirs["checkpoint"]
        if (a.get("sha256"), a.get("random"), a.get("seed") if a.get("random") else None) != (
                b.get("sha256"), b.get("random"), b.get("seed") if b.get("random") else None):
            return "checkpoint differs (sha256/random weights/seed)"
        return None

    def merge(self, other: "Manifest") -> "Manifest":
        """This manifest plus the graphs/files/engines of `other` (same checkpoint, precision,
        flavor); `other` wins for keys both have, and an engine whose graph was replaced is dropped."""
        why = self.compatible(other)
        if why:
            raise SgexError(f"cannot add to the existing {self.task!r} export: {why}; "
                            f"export into another --out directory")
        out = Manifest(copy.deepcopy(self.data))
        for k, g in other.graphs.items():
            if k in out.engines and out.graphs.get(k, {}).get("sha256") != g["sha256"]:
                del out.engines[k]
            out.graphs[k] = copy.deepcopy(g)
        out.files.update(other.files)
        out.engines.update(copy.deepcopy(other.engines))
        out.data["versions"] = copy.deepcopy(other.versions)
        out.data["created"] = other.data["created"]
        out.validate()
        return out

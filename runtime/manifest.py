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
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from runtime.buckets import Bucket
from runtime.errors import SgexError
from runtime.tasks import TASKS

FORMAT = "sgex-manifest"
VERSION = 2  # 2: buckets named by the output side (1: by the input side)
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16")
FLAVORS = ("portable", "plugin")
# Optional top-level field: the OpenVINO BF16 accuracy gate written by `sgex-calib --bf16`
# (calib/bf16.py) and read by runtime/backends/openvino.py.
BF16_GATE = "openvino_bf16"
REQUIRED = ("task", "variant", "precision", "flavor", "noise", "style_dim", "n_latent", "inputs",
            "checkpoint", "graphs", "files", "engines", "versions", "created")

__all__ = [
    "Manifest", "FORMAT", "VERSION", "MANIFEST_NAME", "BF16_GATE", "sha256_file", "graph_key", "parse_graph_key",
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
    """Write to a temp file in the same directory, fsync, then os.replace (never a partial file).
    The file gets the usual umask-derived mode (mkstemp's 0600 would hide artifacts from others)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _safe_relpath(rel: str, what: str) -> str:
    """Manifest file entries are relative paths inside the task directory."""
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        raise SgexError(f"manifest: {what} has an unsafe file path {rel!r}")
    return rel


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
        d = self.data
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            fmt = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise SgexError(f"{source}: not an sgex manifest (format {fmt!r}, expected {FORMAT!r})")
        if d.get("version") == 1:
            raise SgexError(f"{source}: an export of the old layout (manifest version 1, buckets named by "
                            f"the input side); re-export it with sgex-export (--res is now the output side)")
        if d.get("version") != VERSION:
            raise SgexError(f"{source}: manifest version {d.get('version')!r} is not supported "
                            f"(this sgex reads version {VERSION})")
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise SgexError(f"{source}: manifest lacks {', '.join(missing)}")
        if d["task"] not in TASKS:
            raise SgexError(f"{source}: unknown task {d['task']!r}")
        if d["precision"] not in PRECISIONS:
            raise SgexError(f"{source}: unknown precision {d['precision']!r}")
        if d["flavor"] not in FLAVORS:
            raise SgexError(f"{source}: unknown flavor {d['flavor']!r}")
        for key, g in d["graphs"].items():
            parse_graph_key(key)
            for f in ("file", "sha256", "inputs", "outputs"):
                if f not in g:
                    raise SgexError(f"{source}: graph {key!r} lacks {f!r}")
            _safe_relpath(g["file"], f"graph {key!r}")
        for rel in d["files"]:
            _safe_relpath(rel, "files")
        for key, e in d["engines"].items():
            if "file" not in e or "sha256" not in e:
                raise SgexError(f"{source}: engine {key!r} lacks file/sha256")
            _safe_relpath(e["file"], f"engine {key!r}")

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

    def read_verified(self, directory: str | os.PathLike, key: str) -> bytes:
        """The bytes of graph or engine `key`, read once and checked against the manifest's
        sha256: a caller that loads these bytes runs exactly what was hashed (a file changed after
        `verify` is refused here, not run)."""
        entry = self.engines.get(key) if key in self.engines and key not in self.graphs else self.graph(key)
        p = Path(directory) / entry["file"]
        if not p.is_file():
            raise SgexError(f"{p}: missing ({key} of manifest for task {self.task!r})")
        data = p.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise SgexError(f"{p}: sha256 does not match the manifest ({key}); the file was "
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

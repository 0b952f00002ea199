"""sgex-triton: An NVIDIA Triton Inference Server model repository for one exported task.

From a verified export (`sgex-export`), one Triton model per graph and bucket:

    <repo>/<prefix>_<task>_style/         style graph (RGB tasks), fixed 256x256, dynamic batch
    <repo>/<prefix>_<task>_synth_<side>/  synth (or translate) of one bucket, dynamic H and W
    <repo>/<prefix>_<task>_<side>/        RGB tasks: the ensemble style -> synth of that bucket

Each model is `onnxruntime_onnx` (1/model.onnx), or `tensorrt_plan` where the export has a
TensorRT engine for that graph: the engine goes to 1/model_<cc>.plan and `cc_model_filenames`
maps the compute capability it was built for ("9.0") to that file, the GPU-specific naming Triton
supports, so engines for other GPUs can be added beside it. config.pbtxt carries the graph's I/O
names and dtypes from the manifest, dims without the batch dimension (-1 for dynamic height and
width), max_batch_size = the bucket's max batch, and dynamic_batching. Every config.pbtxt is
parsed with Triton's own schema (tritonclient's model_config_pb2) before the repository is
renamed into place, so a written repository is one Triton's config parser accepts.

The models take the graphs' float32 NCHW tensors: the client normalizes, pads to the bucket's
multiple and draws the seeded noise maps (docs/cpp.md, "I/O contract"); the Python pipeline with
those steps is `sgex-serve`. Triton's server itself cannot run on sgex's machines: only the
repository's schema and its agreement with the ONNX graphs are tested here.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path

from runtime._cli import run_main, setup_logging
from runtime.errors import SgexError, require

log = logging.getLogger("sgex-triton")

PROG = "sgex-triton"
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
                 "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}

EPILOG = """\
examples:
  sgex-export --task superres --res 512 --ckpt styleganex_sr.pt --out artifacts
  sgex-triton --artifacts artifacts/superres --out triton-repo
  tritonserver --model-repository=$PWD/triton-repo        # on a machine with Triton (not ours)
  # ONNX models on CPU instances, up to 2 ms of dynamic-batching delay
  sgex-triton --artifacts artifacts/toonify --out repo --instance-kind cpu --max-queue-delay-us 2000

notes:
  The repository is written to a temporary folder beside --out and renamed into place; an
  existing non-empty --out is refused. Model files are hard links to the verified artifacts
  where the filesystem allows, else copies (logged).
"""


# -- config.pbtxt text --------------------------------------------------------------------------

def _q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor_block(t: dict) -> str:
    dims = ", ".join(str(d) for d in t["dims"])
    return f"  {{\n    name: {_q(t['name'])}\n    data_type: {t['data_type']}\n    dims: [ {dims} ]\n  }}"


def config_text(cfg: dict) -> str:
    """The config.pbtxt (protobuf text format of Triton's ModelConfig) for a model description:
    {name, platform, max_batch_size, inputs, outputs, [instance_kind, max_queue_delay_us,
    cc_model_filenames, default_model_filename, steps]}."""
    lines = [f"name: {_q(cfg['name'])}", f"platform: {_q(cfg['platform'])}",
             f"max_batch_size: {cfg['max_batch_size']}"]
    if cfg.get("default_model_filename"):
        lines.append(f"default_model_filename: {_q(cfg['default_model_filename'])}")
    for cc, fname in sorted(cfg.get("cc_model_filenames", {}).items()):
        lines.append(f"cc_model_filenames {{ key: {_q(cc)} value: {_q(fname)} }}")
    for kind, key in (("input", "inputs"), ("output", "outputs")):
        lines.append(f"{kind} [\n" + ",\n".join(_tensor_block(t) for t in cfg[key]) + "\n]")
    if cfg["platform"] == "ensemble":
        steps = []
        for s in cfg["steps"]:
            maps = [f"      input_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in s["input_map"].items()]
            maps += [f"      output_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in s["output_map"].items()]
            steps.append("    {\n" f"      model_name: {_q(s['model_name'])}\n      model_version: -1\n"
                         + "\n".join(maps) + "\n    }")
        lines.append("ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}")
    else:
        lines.append(f"instance_group [ {{ count: 1 kind: {cfg['instance_kind']} }} ]")
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {cfg['max_queue_delay_us']} }}")
    return "\n".join(lines) + "\n"


def _schema():
    """(model_config_pb2, text_format): Triton's config schema as tritonclient ships it."""
    pb = require("tritonclient.grpc.model_config_pb2", "triton-repo", "tritonclient (Triton's model config schema)")
    return pb, require("google.protobuf.text_format", "triton-repo", "protobuf")


def parse_config(text: str):
    """Parse config.pbtxt text with Triton's schema -> model_config_pb2.ModelConfig
    (protobuf's text_format refuses unknown fields and bad values)."""
    pb, text_format = _schema()
    return text_format.Parse(text, pb.ModelConfig())


# -- models from the manifest -------------------------------------------------------------------

def _tensors(entries: list[dict], what: str) -> list[dict]:
    """Manifest I/O entries [{name, dtype, shape: ["batch", 3, "height", ...]}] -> Triton tensors
    (batch dimension dropped, every symbolic dimension -1)."""
    out = []
    for e in entries:
        shape = e["shape"]
        if not shape or shape[0] != "batch":
            raise SgexError(f"{what}: {e['name']} has no leading dynamic batch dimension ({shape})")
        if e["dtype"] not in TRITON_DTYPES:
            raise SgexError(f"{what}: {e['name']} has dtype {e['dtype']}, which Triton has no type for here")
        dims = [d if isinstance(d, int) else -1 for d in shape[1:]]
        out.append({"name": e["name"], "data_type": TRITON_DTYPES[e["dtype"]], "dims": dims})
    return out


def _max_batch(entry: dict, manifest) -> int:
    if entry.get("bucket"):
        return int(entry["bucket"]["max_batch"])
    batch = entry.get("dims", {}).get("batch", {})
    if "max" in batch:
        return int(batch["max"])
    return min(b.max_batch for b in manifest.buckets())


def plan_models(manifest, prefix: str = "sgex", *, instance_kind: str = "gpu",
                max_queue_delay_us: int = 1000) -> list[dict]:
    """The repository's models for a verified manifest, each {name, platform, max_batch_size,
    inputs, outputs, ..., "files": [(source relative to the task dir, name inside 1/)]}."""
    if instance_kind not in INSTANCE_KINDS:
        raise SgexError(f"--instance-kind must be one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}")
    if max_queue_delay_us < 0:
        raise SgexError(f"--max-queue-delay-us must be >= 0, got {max_queue_delay_us}")
    task = manifest.task
    models, per_graph = [], {}
    for key, entry in manifest.graphs.items():
        graph = entry["graph"]
        side = entry["bucket"]["side"] if entry.get("bucket") else None
        name = f"{prefix}_{task}_{graph}" + (f"_{side}" if side is not None else "")
        engine = manifest.engines.get(key)
        if engine is None and manifest.flavor == "plugin":
            raise SgexError(f"graph {key} is plugin flavor: its fused op runs in ONNX Runtime only as a "
                            f"Python op, which Triton cannot load; build TensorRT engines or export "
                            f"--flavor portable")
        m = {"name": name, "graph_key": key, "graph": graph, "side": side,
             "max_batch_size": _max_batch(entry, manifest),
             "inputs": _tensors(entry["inputs"], key), "outputs": _tensors(entry["outputs"], key),
             "instance_kind": INSTANCE_KINDS[instance_kind], "max_queue_delay_us": int(max_queue_delay_us)}
        if engine is not None:
            cc = engine.get("compute_capability")
            if not cc:
                raise SgexError(f"engine {key}: the manifest does not say which compute capability it was built for")
            if instance_kind != "gpu":
                raise SgexError(f"graph {key} has a TensorRT engine, which runs on GPU instances only")
            fname = f"model_{cc}.plan"
            m.update(platform="tensorrt_plan", cc_model_filenames={cc: fname}, files=[(engine["file"], fname)])
        else:
            m.update(platform="onnxruntime_onnx", default_model_filename="model.onnx",
                     files=[(entry["file"], "model.onnx")])
        models.append(m)
        per_graph.setdefault(graph, []).append(m)
    for synth in per_graph.get("synth", []):
        style = per_graph.get("style", [None])[0]
        if style is None:
            raise SgexError(f"task {task}: the export has synth graphs but no style graph")
        models.append(_ensemble(f"{prefix}_{task}_{synth['side']}", style, synth))
    return models


def _ensemble(name: str, style: dict, synth: dict) -> dict:
    """style -> synth: the ensemble takes x2 and every synth input but wplus, which the style
    step's output feeds by name."""
    (wplus,) = [t for t in style["outputs"]]
    link = wplus["name"]
    if link not in [t["name"] for t in synth["inputs"]]:
        raise SgexError(f"{synth['name']} has no input {link!r} for the style output")
    inputs = style["inputs"] + [t for t in synth["inputs"] if t["name"] != link]
    return {"name": name, "platform": "ensemble", "files": [],
            "max_batch_size": min(style["max_batch_size"], synth["max_batch_size"]),
            "inputs": inputs, "outputs": synth["outputs"],
            "steps": [
                {"model_name": style["name"], "input_map": {t["name"]: t["name"] for t in style["inputs"]},
                 "output_map": {link: link}},
                {"model_name": synth["name"], "input_map": {t["name"]: t["name"] for t in synth["inputs"]},
                 "output_map": {t["name"]: t["name"] for t in synth["outputs"]}},
            ]}


# -- writing ---------------------------------------------------------------------------------

def _place(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copyfile(src, dst)
        return "copied"


def write_repository(artifacts, out, *, prefix: str = "sgex", instance_kind: str = "gpu",
                     max_queue_delay_us: int = 1000) -> list[dict]:
    """Write the Triton model repository of the export at `artifacts` to `out` (see the module
    doc); returns the models written. The export is verified (every sha256) first."""
    from runtime.engine import _task_dir
    from runtime.manifest import Manifest

    d = _task_dir(artifacts, None)
    manifest = Manifest.load(d)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SgexError(f"{out}: exists and is not an empty folder; choose another --out")
    if not out.parent.is_dir():
        raise SgexError(f"{out.parent}: output directory does not exist")
    if not prefix or not prefix.replace("_", "").replace("-", "").isalnum():
        raise SgexError(f"--prefix {prefix!r}: use letters, digits, '_' and '-'")
    models = plan_models(manifest, prefix, instance_kind=instance_kind, max_queue_delay_us=max_queue_delay_us)
    _schema()  # refuse before writing anything when the schema is not installed
    manifest.verify(d)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        how = set()
        for m in models:
            text = config_text(m)
            parsed = parse_config(text)
            if parsed.name != m["name"]:
                raise SgexError(f"config of {m['name']} parsed as {parsed.name!r}")
            mdir = tmp / m["name"]
            (mdir / "1").mkdir(parents=True)  # Triton wants a version folder, also for an ensemble
            (mdir / "config.pbtxt").write_text(text)
            for rel, fname in m["files"]:
                how.add(_place(d / rel, mdir / "1" / fname))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d Triton models to %s (%s); model files %s", len(models), out,
             ", ".join(f"{m['name']} [{m['platform']}]" for m in models), " or ".join(sorted(how)) or "none")
    return models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", required=True, metavar="DIR", help="exported task directory (sgex-export)")
    p.add_argument("--out", required=True, metavar="DIR", help="the model repository to write (new or empty)")
    p.add_argument("--prefix", default="sgex", help="model name prefix (default sgex: sgex_<task>_...)")
    p.add_argument("--instance-kind", default="gpu", choices=list(INSTANCE_KINDS),
                   help="Triton instance kind of the ONNX models (default gpu; engines are always gpu)")
    p.add_argument("--max-queue-delay-us", type=int, default=1000, metavar="US",
                   help="dynamic batching: longest wait for a batch to fill (default 1000 us)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_main(PROG, lambda: _run(args))


def _run(args) -> int:
    write_repository(args.artifacts, args.out, prefix=args.prefix, instance_kind=args.instance_kind,
                     max_queue_delay_us=args.max_queue_delay_us)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""OpenVINO backend of `runtime.Engine`: the exported FP32 ONNX graphs on the CPU, in FP32 or BF16.

    Engine("artifacts/superres", backend="openvino")                     # precision fp32
    Engine("artifacts/superres", backend="openvino", precision="bf16")  # needs a passing BF16 gate

Precision is OpenVINO's inference precision hint, set explicitly either way: on a CPU with native
BF16 OpenVINO would otherwise pick BF16 by itself, so "fp32" asks for f32 (with the ACCURACY
execution mode) and "bf16" asks for bf16. BF16 runs only where the CPU computes BF16 natively
(OpenVINO lists "BF16" in OPTIMIZATION_CAPABILITIES, and on Linux /proc/cpuinfo has avx512_bf16 or
amx_bf16); elsewhere it is one error line, never an emulated slow path. `SGEX_ASSUME_NO_BF16=1`
makes this check fail on purpose (tests; checking the error path on a BF16 machine).

The accuracy gate (calib/bf16.py, `sgex-calib --bf16`) measures BF16 against FP32 per graph and
records, in the manifest field named by runtime.manifest.BF16_GATE, which ONNX nodes must stay
FP32 (`fp32_nodes`, or a whole graph: `graph_precision` "fp32"), whether the graph passed, tied
to the graph's sha256, and whether the style -> synth pipeline passed. precision="bf16" refuses a
directory without a passing record (of the current GATE_VERSION) for every graph and the
pipeline unless force_precision=True (then it logs a warning). Pinned nodes are kept in FP32
with OpenVINO's per-node runtime attribute "precise" (ov::DisableFP16Compression, honoured by the CPU plugin's BF16 enforcement); the Python
API cannot create that attribute, so the graph is written once as OpenVINO IR in a private temp
directory, the attribute is added to the pinned layers' XML and the IR is read back
(`pin_fp32`). OpenVINO's ONNX frontend names each op after its ONNX node, which is how nodes are
matched; a pin that matches no op is an error.

Integrity: every graph is compiled from the bytes `Manifest.read_verified` hashed, never re-read
from disk by OpenVINO. Threads: `threads` (default: the CPUs of the process's affinity set,
os.sched_getaffinity), one stream, latency hint. Compiled models are cached by OpenVINO in
<artifacts>/.openvino-cache/<openvino version>-<cpu key>/ (its CACHE_DIR; OpenVINO keys the blobs
by the model, the config and the device inside it); a directory that cannot be written means no
cache (logged). The graphs' dynamic batch/height/width stay dynamic.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from runtime.backends.base import Backend
from runtime.errors import SgexError, require
from runtime.manifest import BF16_GATE

GATE_VERSION = 2  # the record calib.bf16 writes (calib.bf16.GATE_VERSION must equal it)

log = logging.getLogger(__name__)

EXTRA = "openvino"
DEVICE = "CPU"
PRECISIONS = ("fp32", "bf16")
HINTS = {"fp32": ("f32", "ACCURACY"), "bf16": ("bf16", "PERFORMANCE")}  # (inference precision, execution mode)
NO_BF16_ENV = "SGEX_ASSUME_NO_BF16"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CACHE_DIRNAME = ".openvino-cache"
PIN_ATTRIBUTE = '<attribute name="precise" version="0" />'  # ov::DisableFP16Compression in IR v11
GATE_HINT = "run `sgex-calib --bf16 --artifacts DIR` first, or force it with --force-precision"


def import_openvino():
    return require("openvino", EXTRA, "OpenVINO")


def default_threads() -> int:
    """The number of CPUs this process may run on (its affinity set; os.cpu_count elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else None


def bf16_support(core) -> tuple[bool, str]:
    """(True, "") when this CPU computes BF16 natively, else (False, why)."""
    if os.environ.get(NO_BF16_ENV, "") not in ("", "0"):
        return False, f"{NO_BF16_ENV} is set (simulating a CPU without BF16)"
    caps = list(core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
    if "BF16" not in caps:
        return False, f"OpenVINO lists no BF16 for this CPU (capabilities: {', '.join(caps)})"
    flags = _cpuinfo_flags()
    if flags is not None and not flags & set(NATIVE_BF16_FLAGS):
        return False, f"the CPU has none of {', '.join(NATIVE_BF16_FLAGS)} (OpenVINO would emulate BF16)"
    return True, ""


def cpu_key(core) -> str:
    """A directory-safe identity of the CPU for the compiled-model cache: its name and a hash of
    OpenVINO's capability list and the cpuinfo flags (another CPU model gets another cache)."""
    name = str(core.get_property(DEVICE, "FULL_DEVICE_NAME"))
    caps = ",".join(core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
    flags = " ".join(sorted(_cpuinfo_flags() or ()))
    digest = hashlib.sha256(f"{name}|{caps}|{flags}".encode()).hexdigest()[:12]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:48] + "-" + digest


def cache_dir(artifacts_dir, ov_version: str, cpu: str) -> Path | None:
    """<artifacts>/.openvino-cache/<version>-<cpu>, created; None when it cannot be written."""
    d = Path(artifacts_dir) / CACHE_DIRNAME / re.sub(r"[^A-Za-z0-9._-]+", "_", f"{ov_version}-{cpu}")
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        log.info("openvino backend: no compiled-model cache (%s is not writable: %s)", d, e.strerror or e)
        return None
    return d


def compile_config(precision: str, threads: int, cache: Path | None) -> dict:
    """The compile_model properties of one graph (precision set explicitly, see the module doc)."""
    if precision not in PRECISIONS:
        raise SgexError(f"openvino precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if threads < 1:
        raise SgexError(f"threads must be >= 1, got {threads}")
    hint, mode = HINTS[precision]
    cfg = {"INFERENCE_PRECISION_HINT": hint, "EXECUTION_MODE_HINT": mode, "INFERENCE_NUM_THREADS": threads,
           "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if cache is not None:
        cfg["CACHE_DIR"] = str(cache)
    return cfg


def pin_fp32(core, onnx_bytes: bytes, nodes) -> object:
    """The ov.Model of an ONNX graph with the ops named in `nodes` (ONNX node names) kept in FP32
    under a BF16 inference hint (see the module doc). SgexError when a name matches no op."""
    import xml.etree.ElementTree as ET

    ov = import_openvino()
    model = core.read_model(onnx_bytes)
    nodes = set(nodes)
    if not nodes:
        return model
    with tempfile.TemporaryDirectory(prefix="sgex-ov-") as tmp:
        xml_path, bin_path = os.path.join(tmp, "g.xml"), os.path.join(tmp, "g.bin")
        ov.save_model(model, xml_path, compress_to_fp16=False)
        del model
        tree = ET.parse(xml_path)
        weights = np.fromfile(bin_path, dtype=np.uint8) if os.path.getsize(bin_path) else np.zeros(0, np.uint8)
    found = set()
    attribute = ET.fromstring(PIN_ATTRIBUTE)
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") in nodes:
            found.add(layer.get("name"))
            rt = layer.find("rt_info")
            if rt is None:
                rt = ET.Element("rt_info")
                layer.insert(0, rt)
            rt.append(attribute)
    missing = sorted(nodes - found)
    if missing:
        raise SgexError(f"openvino: {len(missing)} FP32 pin(s) match no op of the graph (first: {missing[0]!r}); "
                        f"the BF16 gate record belongs to another export")
    pinned = core.read_model(ET.tostring(tree.getroot(), encoding="unicode"), ov.Tensor(weights))
    pinned._sgex_weights = weights  # noqa: SLF001  the constants may view this buffer: keep it alive
    return pinned


def gate_entry(manifest, key: str) -> tuple[dict | None, str]:
    """(the BF16 gate record of graph `key`, "") when it passed for exactly this graph file, else
    (None, why)."""
    gate = manifest.data.get(BF16_GATE)
    if not isinstance(gate, dict) or not isinstance(gate.get("graphs"), dict):
        return None, "the manifest has no BF16 accuracy report"
    if gate.get("version") != GATE_VERSION:
        return None, (f"the BF16 accuracy report is version {gate.get('version')}, this sgex reads version "
                      f"{GATE_VERSION} (it gates the style -> synth pipeline too); re-run it")
    pipe = gate.get("pipeline")
    if not isinstance(pipe, dict):
        return None, "the BF16 accuracy report has no pipeline section; re-run it"
    failed = sorted(k for k, p in pipe.items() if not (isinstance(p, dict) and p.get("passed") is True))
    if failed:
        return None, (f"the style -> {failed[0]} pipeline failed the BF16 accuracy gate (PSNR "
                      f"{pipe[failed[0]].get('psnr')} dB < {gate.get('target_psnr')})")
    entry = gate["graphs"].get(key)
    if not isinstance(entry, dict):
        return None, f"the BF16 accuracy report does not cover graph {key}"
    if entry.get("sha256") != manifest.graph(key)["sha256"]:
        return None, f"the BF16 accuracy report of graph {key} was measured on another file"
    if entry.get("passed") is not True:
        return None, f"graph {key} failed the BF16 accuracy gate (PSNR {entry.get('psnr')} dB < {gate.get('target_psnr')})"
    if entry.get("graph_precision", "bf16") not in PRECISIONS:
        return None, f"the BF16 accuracy report of graph {key} names precision {entry.get('graph_precision')!r}"
    return entry, ""


class OpenvinoBackend(Backend):
    name = "openvino"

    def __init__(self, artifacts_dir, manifest, device: str | None = None, *, precision: str = "fp32",
                 threads: int | None = None, force_precision: bool = False, cache: bool = True):
        """artifacts_dir: the task directory; manifest: its verified runtime.manifest.Manifest.
        precision "fp32" | "bf16"; threads (default: default_threads()); force_precision: run BF16
        without a passing gate record (warned); cache: use the compiled-model cache."""
        if device not in (None, "auto", "cpu"):
            raise SgexError(f"the openvino backend runs on the CPU (device cpu), not {device!r}")
        if precision not in PRECISIONS:
            raise SgexError(f"openvino precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if manifest.precision != "fp32" or manifest.flavor != "portable":
            raise SgexError(f"{artifacts_dir}: the openvino backend runs fp32 portable exports (this one is "
                            f"{manifest.precision}/{manifest.flavor}); BF16 is chosen at compile time")
        ov = import_openvino()
        self._ov = ov
        self.core = ov.Core()
        self.dir = Path(artifacts_dir)
        self.manifest = manifest
        self.precision = precision
        self.threads = default_threads() if threads is None else int(threads)
        self.pins: dict[str, list[str]] = {}
        self.graph_precision: dict[str, str] = {}  # graphs the gate keeps whole in FP32 under bf16
        if precision == "bf16":
            ok, why = bf16_support(self.core)
            if not ok:
                raise SgexError(f"precision bf16 needs a CPU with native BF16: {why}; use --precision fp32")
            self.pins = self._gated_pins(force_precision)
        self.cpu = str(self.core.get_property(DEVICE, "FULL_DEVICE_NAME"))
        self.cache = cache_dir(self.dir, ov.__version__.split("-")[0], cpu_key(self.core)) if cache else None
        self.config = compile_config(precision, self.threads, self.cache)
        self.config_fp32 = compile_config("fp32", self.threads, self.cache)
        self._compiled: dict = {}
        self._models: dict = {}
        self._requests: dict = {}
        self._outputs: dict[str, list[str]] = {}
        log.info("openvino backend: OpenVINO %s, %s, %s, %d thread(s)%s", ov.__version__.split("-")[0], self.cpu,
                 precision, self.threads, f", cache {self.cache}" if self.cache else "")

    def _gated_pins(self, force: bool) -> dict[str, list[str]]:
        """{graph key: FP32 nodes} from the gate record; refuse an ungated graph unless forced."""
        pins = {}
        for key in self.manifest.graphs:
            entry, why = gate_entry(self.manifest, key)
            if entry is None:
                if not force:
                    raise SgexError(f"{self.dir}: precision bf16 refused: {why}; {GATE_HINT}")
                log.warning("openvino backend: BF16 FORCED for %s without a passing accuracy report (%s)", key, why)
                continue
            pins[key] = list(entry.get("fp32_nodes", []))
            if entry.get("graph_precision", "bf16") == "fp32":
                self.graph_precision[key] = "fp32"
                log.info("openvino backend: %s runs FP32 under bf16 (its BF16 accuracy gate kept the whole graph FP32)",
                         key)
        return pins

    def compiled(self, key: str):
        """The compiled model of graph `key` (compiled from the verified bytes on first use)."""
        if key not in self._compiled:
            data = self.manifest.read_verified(self.dir, key)
            pins = self.pins.get(key, [])
            model = pin_fp32(self.core, data, pins) if pins else self.core.read_model(data)
            del data
            fp32 = self.graph_precision.get(key) == "fp32"
            cm = self.core.compile_model(model, DEVICE, self.config_fp32 if fp32 else self.config)
            self._models[key] = model  # a pinned model's constants may view its IR weights buffer
            self._compiled[key] = cm
            self._requests[key] = cm.create_infer_request()
            self._outputs[key] = [o.get_any_name() for o in cm.outputs]
            log.debug("openvino backend: compiled %s (%d FP32 pin(s))", key, len(pins))
        return self._compiled[key]

    def run(self, key: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.compiled(key)
        req = self._requests[key]
        req.infer({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()})
        return {name: np.array(req.get_tensor(name).data, dtype=np.float32, copy=True)
                for name in self._outputs[key]}

    def runtime_precisions(self, key: str) -> dict[str, str]:
        """{op name: runtime precision} of the compiled graph (OpenVINO's execution graph), e.g. to
        check that pins hold: {"node_Conv_12": "f32", ...}."""
        rm = self.compiled(key).get_runtime_model()
        out = {}
        for op in rm.get_ordered_ops():
            ri = op.get_rt_info()
            for name in ri["originalLayersNames"].astype(str).split(","):
                if name:
                    out[name] = ri["runtimePrecision"].astype(str)
        return out

    def describe(self) -> str:
        return f"openvino {self._ov.__version__.split('-')[0]} CPU {self.precision} ({self.threads} threads)"

    def close(self) -> None:
        self._requests.clear()
        self._compiled.clear()
        self._models.clear()

"""The torch backend's fast path: FP16 with a precision plan's FP32 islands, the fused Triton op for
every stride-1 modulated conv, CUDA graphs captured per (graph, bucket, batch, size) and replayed,
and `torch.compile` as an option. `TorchPath` is what `TorchBackend` and sgex-bench's torch
variants run, so the benchmarked path is the deployed one.

Precision (mirrors export.fp16 for ONNX, on the PyTorch module tree): the model is cast to FP16
except its FP32 islands, each a module that keeps FP32 parameters and computes on FP32 inputs
(forward pre-hooks cast them):

  * "scope"   modules named by the plan's fp32_scopes (a path or a dotted child of it; union over
              the plan's graphs, since style and synth share the encoder). The default plan keeps
              decoder.conv1 and decoder.to_rgb1 (the lowest resolution, where the encoder feature
              enters). Their outputs are cast back to FP16 for the FP16 layers after them.
  * "vector"  (rules.vectors_fp32) every module without spatial extent: EqualLinear (mapping,
              modulation styles, style heads), nn.Linear (fusion attention), PixelNorm. Their
              outputs stay FP32: the styles enter the fused op as FP32 (its demodulation runs in
              FP32, kernels/modconv.py) and w+ stays FP32 end to end, as in the ONNX plan. The
              one exception is AdaIN's style linear (`*.norm.style`), whose gamma/beta scale an
              FP16 feature map: cast back to FP16.
  Buffers that carry w+ arithmetic (latent_avg, editing_w) stay FP32.

CUDA graphs: `GraphCache` captures a callable once per key = (graph, bucket, batch, the shape and
dtype of every input) into static input/output buffers and replays it; each call copies its
inputs into the static buffers first. Before capture the callable runs `warmup` times on a side
stream, so the Triton autotuner and cuDNN pick their kernels outside the capture. The graph API
is a parameter so the keying and replay logic is tested on CPU with a fake.

Nothing here claims a speed: sgex-bench measures every variant against the FP32 baseline.
torch is imported lazily (runtime imports without it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from runtime.errors import SgexError, require
from runtime.tasks import N_NOISE

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPHS = ("style", "synth", "translate")
_VECTOR_CLASSES = ("EqualLinear", "Linear", "PixelNorm")
_CAST_BACK_SUFFIXES = (".norm.style",)  # vector islands whose output scales an FP16 feature map
_FP32_BUFFERS = ("latent_avg", "editing_w")


# -- precision --------------------------------------------------------------------------------

def _plan_scopes(plan: dict | None) -> tuple[list[str], bool]:
    """(fp32 scopes over every graph of the plan, vectors_fp32 rule); default plan when None."""
    if plan is None:
        from export.fp16 import DEFAULT_RULES, DEFAULT_SCOPES

        return sorted({s for v in DEFAULT_SCOPES.values() for s in v}), DEFAULT_RULES["vectors_fp32"]
    from export.fp16 import validate_plan

    plan = validate_plan(plan)
    scopes = sorted({s for g in plan["graphs"].values() for s in g.get("fp32_scopes", [])})
    return scopes, bool(plan["rules"]["vectors_fp32"])


def fp32_islands(model, plan: dict | None = None) -> dict[str, str]:
    """Module path -> "scope" | "vector" | "vector-cast" for the outermost module of every FP32
    island of `model` (export.networks.StyleGANEX) under `plan` (None: export.fp16's default
    plan). Modules inside an island are not listed (they are FP32 with it)."""
    scopes, vectors = _plan_scopes(plan)
    known = {name for name, _ in model.named_modules()}
    for s in scopes:
        if s not in known:
            log.warning("precision plan scope %r names no module of this model", s)
    out: dict[str, str] = {}

    def inside(path: str) -> bool:
        return any(path == p or path.startswith(p + ".") for p in out)

    for path, mod in model.named_modules():
        if not path or inside(path):
            continue
        if any(path == s or path.startswith(s + ".") for s in scopes):
            out[path] = "scope"
        elif vectors and type(mod).__name__ in _VECTOR_CLASSES:
            out[path] = "vector-cast" if path.endswith(_CAST_BACK_SUFFIXES) else "vector"
    return out


def _cast_tree(obj, dtype, torch):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple):
        return tuple(_cast_tree(o, dtype, torch) for o in obj)
    if isinstance(obj, list):
        return [_cast_tree(o, dtype, torch) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast_tree(v, dtype, torch) for k, v in obj.items()}
    return obj


def to_fp16(model, plan: dict | None = None) -> dict[str, str]:
    """Cast `model` in place to FP16 with the plan's FP32 islands (module docstring); returns the
    islands (fp32_islands). The model's inputs are then FP16 feature maps (x1, x2, x, noise) and
    FP32 vectors (wplus, editing_w, z)."""
    torch = require("torch", "torch", "PyTorch")
    islands = fp32_islands(model, plan)
    model.half()
    for name in _FP32_BUFFERS:
        b = getattr(model, name, None)
        if isinstance(b, torch.Tensor):
            setattr(model, name, b.float())
    mods = dict(model.named_modules())
    for path, kind in islands.items():
        m = mods[path].float()

        def pre(_m, args, kwargs):
            return _cast_tree(args, torch.float32, torch), _cast_tree(kwargs, torch.float32, torch)

        m.register_forward_pre_hook(pre, with_kwargs=True)
        if kind in ("scope", "vector-cast"):
            m.register_forward_hook(lambda _m, _a, out: _cast_tree(out, torch.float16, torch))
    n_scope = sum(k == "scope" for k in islands.values())
    log.info("torch fp16: %d FP32 islands (%d plan scopes, %d vector modules)", len(islands), n_scope,
             len(islands) - n_scope)
    return islands


# -- CUDA graphs --------------------------------------------------------------------------------

class CudaGraphAPI:
    """The real graph API (torch.cuda.CUDAGraph); GraphCache takes any object with these methods."""

    def __init__(self):
        self.torch = require("torch", "torch", "PyTorch")

    def warmup(self, fn, n: int) -> None:
        torch = self.torch
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(n):
                fn()
        torch.cuda.current_stream().wait_stream(s)

    def capture(self, fn):
        """-> (graph with .replay(), the static output of fn)."""
        g = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(g):
            out = fn()
        return g, out


@dataclass
class _Entry:
    graph: object
    static: dict
    output: object
    replays: int = 0


@dataclass
class GraphCache:
    """One captured graph per key (graph, bucket, batch, input signature), replayed on later calls.

    `__call__(graph, bucket, fn, inputs)` runs fn(**inputs) through the cache. inputs: name ->
    tensor or None (None inputs are passed through as None and are part of the key). The returned
    tensor is the graph's static output: the next replay of the same key overwrites it."""

    api: object = None
    warmup: int = 1
    entries: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.api is None:
            self.api = CudaGraphAPI()

    @staticmethod
    def key(graph: str, bucket, inputs: dict) -> tuple:
        sig = tuple((n, None if t is None else (tuple(t.shape), str(t.dtype), str(t.device)))
                    for n, t in sorted(inputs.items()))
        first = next((t for _, t in sorted(inputs.items()) if t is not None), None)
        batch = None if first is None else int(first.shape[0])
        return graph, bucket, batch, sig

    @property
    def captures(self) -> int:
        return len(self.entries)

    def __call__(self, graph: str, bucket, fn, inputs: dict):
        k = self.key(graph, bucket, inputs)
        e = self.entries.get(k)
        if e is None:
            static = {n: (None if t is None else t.clone()) for n, t in inputs.items()}
            self.api.warmup(lambda: fn(**static), self.warmup)
            g, out = self.api.capture(lambda: fn(**static))
            e = self.entries[k] = _Entry(g, static, out)
            log.info("cuda graph captured: %s bucket %s batch %s (%d graphs)", graph, bucket, k[2],
                     len(self.entries))
        else:
            for n, t in inputs.items():
                if t is not None:
                    e.static[n].copy_(t)
        e.graph.replay()
        e.replays += 1
        return e.output


# -- the path -----------------------------------------------------------------------------------

def compile_fn(fn, mode: str, compiler=None):
    """torch.compile(fn, mode=mode, dynamic=False): shapes are fixed per (bucket, batch, size), as
    for CUDA graphs. `compiler` replaces torch.compile (tests)."""
    if mode not in COMPILE_MODES:
        raise SgexError(f"torch.compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if compiler is None:
        compiler = require("torch", "torch", "PyTorch").compile
    return compiler(fn, mode=mode, dynamic=False)


class TorchPath:
    """One model on one device with the chosen precision, modconv impl, CUDA graphs and compile.

    run(graph, bucket, **inputs) with device tensors (x2 | x1, wplus, editing_w, noises | x, z,
    noises; noises a list of 17 maps or None) returns the graph's output tensor (a fresh tensor:
    with CUDA graphs the static output is cloned unless clone_outputs is False)."""

    def __init__(self, model, device: str, *, precision: str = "fp32", plan: dict | None = None,
                 modconv_impl: str | None = None, cuda_graphs: bool = False,
                 compile_mode: str | None = None, clone_outputs: bool = True, graph_api=None,
                 compiler=None, warmup: int = 1):
        torch = require("torch", "torch", "PyTorch")
        if precision not in PRECISIONS:
            raise SgexError(f"torch precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if cuda_graphs and not str(device).startswith("cuda") and graph_api is None:
            raise SgexError("CUDA graphs need a CUDA device (device is %r)" % device)
        self.device, self.precision = device, precision
        self.islands: dict[str, str] = {}
        if precision == "fp16":
            self.islands = to_fp16(model, plan)
        if modconv_impl is not None:
            model.set_modconv_impl(modconv_impl)
        self.model = model.to(device).eval()
        self.feature_dtype = torch.float16 if precision == "fp16" else torch.float32
        self.vector_dtype = torch.float32
        self.compile_mode = compile_mode
        fns = {g: getattr(model, g) for g in GRAPHS}
        if compile_mode is not None:
            fns = {g: compile_fn(f, compile_mode, compiler) for g, f in fns.items()}
        self._fns = fns
        self.graphs = GraphCache(graph_api, warmup=warmup) if cuda_graphs else None
        self.clone_outputs = clone_outputs

    def input_dtype(self, name: str):
        """Feature maps (x1, x2, x, noise_*) in the feature dtype; vectors (wplus, editing_w, z) FP32."""
        return self.vector_dtype if name in ("wplus", "editing_w", "z") else self.feature_dtype

    def describe(self) -> str:
        parts = [self.precision, f"modconv {getattr(self.model, 'modconv_impl', '?')}"]
        if self.islands:
            parts.append(f"{len(self.islands)} FP32 islands")
        if self.compile_mode:
            parts.append(f"torch.compile({self.compile_mode})")
        if self.graphs is not None:
            parts.append("CUDA graphs per (graph, bucket, batch, size)")
        return ", ".join(parts)

    def run(self, graph: str, bucket=None, **inputs):
        if graph not in self._fns:
            raise SgexError(f"torch path: unknown graph {graph!r} (expected one of {', '.join(GRAPHS)})")
        fn = self._fns[graph]
        if self.graphs is None:
            return fn(**inputs)
        noises = inputs.pop("noises", None)
        flat = dict(inputs)
        if noises is not None:
            if len(noises) != N_NOISE:
                raise SgexError(f"noises: expected {N_NOISE} maps, got {len(noises)}")
            flat.update({f"noise_{j}": n for j, n in enumerate(noises)})

        def call(**kw):
            ns = [kw.pop(f"noise_{j}") for j in range(N_NOISE)] if "noise_0" in kw else None
            return fn(**kw, noises=ns) if graph != "style" else fn(**kw)

        out = self.graphs(graph, bucket, call, flat)
        return out.clone() if self.clone_outputs else out

"""TensorRT plugin `sgex::FusedModulatedConv2d`: the Triton kernel of modconv_triton.py inside an engine.

Registered with the quickly-deployable plugin API (`tensorrt.plugin`, TensorRT >= 10.9):

  @trtp.register   shape/type descriptor: y [B, Cout, H + 2p - d(k-1), W + 2p - d(k-1)] in x's dtype
  @trtp.autotune   one type combination per supported precision (all LINEAR = NCHW), times the
                   tactics = the entries of AOT_CONFIGS (tile sizes); TensorRT times them and keeps
                   the fastest per layer and shape profile
  @trtp.impl       JIT path: torch tensors over TensorRT's buffers, the Triton launcher with the
                   tactic's config, on TensorRT's stream (needs Python + torch + triton at run time)
  @trtp.aot_impl   ahead-of-time path (ONNX node attribute aot=1): the kernel compiled to PTX with
                   triton.compile for this layer's dtypes and attributes, launch grid and the int32
                   scalars as symbolic expressions of the I/O shapes; the PTX is baked into the
                   engine, so a plain C++ TensorRT runtime (trtexec included) runs it without Python

The ONNX node (kernels/onnx_op.py) carries the attributes dilation, padding, demodulate, activate,
has_noise, has_bias (ints) and plugin_namespace="sgex", aot=1, which the TensorRT ONNX parser
consumes. How the six ints reach this module (onnx-tensorrt's plugin importer and TensorRT's
`tensorrt.plugin` template code): the parser walks the creator's declared field names, which are
the attribute parameters of the @trtp.register function in declaration order, looks each one up
in the node by name, and passes an INT attribute as a one-element int32 array (an attribute
missing from the node is skipped with a warning). TensorRT's template then calls aot_impl with
every field positionally, in that declared order, so the order of the node's attributes does not
matter, but a missing one would shift every later argument: every node must carry all six, which
onnx_op.canonicalize_attributes checks. The attributes are declared `npt.NDArray[np.int32]`, as
NVIDIA's quickly_deployable_plugins sample does, and read with `_attr_int`: TensorRT 10.9 to 11.1
convert an int-annotated field with int() on the whole array, which NumPy >= 2.4 refuses. All six
inputs are always present (placeholders when has_noise / has_bias are 0).

What a plugin build needs besides the trt extra: triton and torch (the AOT path compiles the
kernel with triton.compile; kernels.modconv_triton imports torch, a CPU build is enough), and for
the JIT path (aot=0) a CUDA build of torch, which runs the kernel at inference time.
`register()` and `require_jit_runtime()` say so in one line (`PluginUnavailable`).

The PTX is compiled for the GPU building the engine (the current CUDA device, read with
cuda-python, which the trt extra installs); for Hopper Triton emits `.target sm_90a`, which runs
on sm_90 parts only -- TensorRT engines are tied to the GPU they were built on anyway.

Triton's hidden kernel parameters. Since Triton 3.3 every compiled kernel takes a trailing
`global_scratch` pointer, and since 3.5 also `profile_scratch`; Triton's own launcher appends them,
TensorRT's AOT launcher does not (it passes inputs, the SymIntExprs extra args and outputs, and
the driver reads as many parameters as the PTX entry declares). KernelLaunchParams has no way to
add pointer arguments, and extra args are int32 only. What this module does: it requires the
compiled kernel to use no scratch at all (metadata global_scratch_size == 0 and
profile_scratch_size == 0: true for this kernel, which has no device-side TMA descriptors, no
printf and no profiling), checks that the PTX body never reads the trailing parameters, and removes
them from the `.entry` declaration (`strip_hidden_params`), so the PTX declares exactly the 13
parameters TensorRT passes. A kernel that does need scratch is refused with an error.

What was run where: the PTX generation (triton.compile for a CUDA target works without a GPU),
the parameter stripping and the assembly of the stripped PTX with Triton's bundled ptxas are
tested on CPU. `register()` and the shape, format, tactic and AOT launch functions are run on CPU
through TensorRT's own `tensorrt.plugin` code (tensorrt-cu13-bindings 11.4) loaded with stand-in
native libraries (tests/kernels/test_trt_plugin_standin.py: it proves that TensorRT's validation
and template code accept these definitions, not that an engine builds). No engine was built in this
project: the engine build/run tests (marked `trt`) are written to be run by a TensorRT user and
skip elsewhere.

`register()` imports tensorrt; it is called by the engine builder and by an app that deserializes
an engine built with the JIT path (aot=0). Nothing here is imported by `kernels/__init__`.
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the annotations of the
# decorated functions as objects (trtp.TensorDesc, npt.NDArray[np.int32], the aot_impl return).
import functools
import re
import threading
from dataclasses import dataclass
from typing import Tuple, Union

__all__ = [
    "PLUGIN_ID",
    "AOT_CONFIGS",
    "PluginUnavailable",
    "TensorRTMissing",
    "PluginDepsMissing",
    "register",
    "require_jit_runtime",
    "kernel_signature",
    "compile_ptx",
    "strip_hidden_params",
    "entry_params",
    "extra_scalar_values",
    "MAX_STATIC_SHARED",
]

PLUGIN_NAMESPACE = "sgex"
PLUGIN_NAME = "FusedModulatedConv2d"  # = kernels.onnx_op.OP_TYPE (the parser matches op_type to it)
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
INSTALL_HINT = "pip install -c constraints.txt 'sgex[trt]'"  # kernels imports nothing from sgex
PLUGIN_DEPS_HINT = "pip install -c constraints.txt 'sgex[trt,triton,torch]'"

# Tactics of the plugin: tile configs compiled ahead of time. Shared memory stays under the
# 48 KiB a kernel may use without cuFuncSetAttribute (TensorRT's AOT launcher sets no attributes);
# `compile_ptx` refuses a config that needs more. Measured for sm_90, 3x3: fp32 41088 / ~33k /
# ~33k / 41216 B, fp16 12416 B and less (fp32 tiles are twice the bytes and cp.async-pipelined).
AOT_CONFIGS = (
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=3),  # ToRGB (Cout = 3)
)
MAX_STATIC_SHARED = 48 * 1024

_lock = threading.Lock()
_registered = False
_failed: str | None = None  # why the one registration attempt of this process failed


class PluginUnavailable(ImportError):
    """Something the plugin needs is not importable (one line, with the install command)."""


class TensorRTMissing(PluginUnavailable):
    """TensorRT (with the tensorrt.plugin module, >= 10.9) is not importable."""

    def __init__(self, detail: str = ""):
        super().__init__(f"TensorRT >= 10.9 with tensorrt.plugin is not installed ({INSTALL_HINT})"
                         + (f": {detail}" if detail else ""))


class PluginDepsMissing(PluginUnavailable):
    """triton / torch (or a CUDA build of torch for the JIT path) is missing."""


# --------------------------------------------------------------------------------------------
# CPU-testable pieces: signature, PTX, hidden parameters, scalar arguments
# --------------------------------------------------------------------------------------------

_TRITON_DTYPE = {"float32": "fp32", "float16": "fp16"}


def kernel_signature(x_dtype: str, style_dtype: str) -> dict:
    """triton.compile signature of modconv_triton's kernel: {arg name: type} for the 13 runtime
    arguments (pointers typed by dtype, int scalars i32). Dtypes as "float32" / "float16"."""
    from kernels.modconv_triton import KERNEL_ARG_NAMES

    t, s = _TRITON_DTYPE[x_dtype], _TRITON_DTYPE[style_dtype]
    per_arg = dict(x_ptr=t, w_ptr=t, style_ptr=s, noise_ptr=t, ns_ptr=s, bias_ptr=t, y_ptr=t)
    return {n: (f"*{per_arg[n]}" if n in per_arg else "i32") for n in KERNEL_ARG_NAMES}


@dataclass(frozen=True)
class CompiledKernel:
    name: str           # PTX entry name
    ptx: str            # hidden parameters removed
    num_warps: int
    shared: int         # bytes of static shared memory
    n_params: int       # parameters of the .entry after stripping (13)


def compile_ptx(*, x_dtype: str, style_dtype: str, ksize: int, dilation: int, padding: int,
                demodulate: bool, has_noise: bool, has_bias: bool, activate: bool, config: dict,
                arch: int = 90) -> CompiledKernel:
    """Compile the kernel for one layer to PTX for sm_`arch` (no GPU needed) and strip Triton's
    hidden scratch parameters. Pointer arguments are declared 16-byte aligned (TensorRT buffers
    are 256-byte aligned), which lets Triton vectorise loads exactly as its own launcher would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.modconv_triton import KERNEL_ARG_NAMES, jit_kernel

    tiles = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    constexprs = dict(KSIZE=int(ksize), DILATION=int(dilation), PADDING=int(padding),
                      DEMODULATE=bool(demodulate), HAS_NOISE=bool(has_noise), HAS_BIAS=bool(has_bias),
                      ACTIVATE=bool(activate), TF32X3=x_dtype == "float32", **tiles)
    signature = kernel_signature(x_dtype, style_dtype)
    signature.update({k: "constexpr" for k in constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(KERNEL_ARG_NAMES) if n.endswith("_ptr")}
    src = ASTSource(fn=jit_kernel(), signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config["num_warps"], num_stages=config["num_stages"]))
    md = compiled.metadata
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(md, field, 0):
            raise RuntimeError(f"{PLUGIN_ID}: the compiled kernel needs {field}={getattr(md, field)} "
                               "bytes; TensorRT's AOT launcher cannot pass a scratch buffer")
    if md.shared > MAX_STATIC_SHARED:
        raise RuntimeError(f"{PLUGIN_ID}: config {config} needs {md.shared} B of shared memory "
                           f"(> {MAX_STATIC_SHARED}); TensorRT's AOT launcher sets no opt-in attribute")
    ptx = strip_hidden_params(compiled.asm["ptx"], md.name, len(KERNEL_ARG_NAMES))
    return CompiledKernel(md.name, ptx, md.num_warps, md.shared, len(entry_params(ptx, md.name)))


def entry_params(ptx: str, name: str) -> list[str]:
    """Parameter names of the PTX `.entry name(...)` declaration, in order."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise ValueError(f"no .entry {name} in the PTX")
    return [p.split()[-1] for p in m.group(1).split(",") if p.strip()]


def strip_hidden_params(ptx: str, name: str, n_keep: int) -> str:
    """Remove the parameters after the first `n_keep` from `.entry name(...)`, after checking that
    the kernel body never references them (see the module docstring)."""
    m = re.search(r"(\.entry\s+" + re.escape(name) + r"\s*\()(.*?)(\))", ptx, re.S)
    if m is None:
        raise ValueError(f"no .entry {name} in the PTX")
    decls = [d for d in m.group(2).split(",") if d.strip()]
    if len(decls) < n_keep:
        raise ValueError(f".entry {name} declares {len(decls)} parameters, expected at least {n_keep}")
    hidden = [d.split()[-1] for d in decls[n_keep:]]
    body = ptx[m.end():]
    for p in hidden:
        if re.search(re.escape(p) + r"\b", body):
            raise RuntimeError(f"{PLUGIN_ID}: the kernel reads hidden parameter {p}; it cannot run "
                               "under TensorRT's AOT launcher")
    return ptx[:m.start(2)] + ",".join(decls[:n_keep]) + "\n" + ptx[m.end(2):]


def extra_scalar_values(x_shape, weight_shape, y_shape) -> tuple:
    """The int scalars in kernel order (C_in, C_out, H, W, H_out, W_out) from concrete or symbolic
    shapes; aot_impl passes TensorRT shape expressions, tests pass ints."""
    return (weight_shape[1], weight_shape[0], x_shape[2], x_shape[3], y_shape[2], y_shape[3])


# --------------------------------------------------------------------------------------------
# Registration with TensorRT
# --------------------------------------------------------------------------------------------

def register() -> None:
    """Register sgex::FusedModulatedConv2d with TensorRT's plugin registry (idempotent).

    Raises TensorRTMissing when tensorrt / tensorrt.plugin cannot be imported and PluginDepsMissing
    when triton or torch is missing (the AOT path compiles the kernel with them). A registration
    that failed half-way cannot be retried in the same process (TensorRT keeps the half-made
    definition), so later calls repeat the first error instead of TensorRT's "already has a
    definition"."""
    global _registered, _failed
    with _lock:
        if _registered:
            return
        if _failed is not None:
            raise RuntimeError(f"{PLUGIN_ID}: registration already failed in this process ({_failed}); "
                               "fix the cause and restart the process")
        try:
            import tensorrt as trt
            import tensorrt.plugin as trtp
        except ImportError as e:
            raise TensorRTMissing(str(e)) from None
        if not hasattr(trtp, "aot_impl"):
            raise TensorRTMissing(f"tensorrt {trt.__version__} has no tensorrt.plugin.aot_impl")
        _require("triton", "triton")
        _require("torch", "torch")
        try:
            _define(trt, trtp)
        except Exception as e:
            _failed = f"{type(e).__name__}: {e}"
            raise
        _registered = True


def _require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise PluginDepsMissing(f"{PLUGIN_ID} needs {what}, which the trt extra does not install "
                                f"({PLUGIN_DEPS_HINT})")


def require_jit_runtime() -> None:
    """The JIT plugin (aot=0) runs the Triton kernel through torch at inference time: it needs
    triton and a CUDA build of torch. PluginDepsMissing otherwise."""
    _require("triton", "triton")
    _require("torch", "torch")
    import torch

    if not torch.cuda.is_available():
        raise PluginDepsMissing(f"{PLUGIN_ID}: the JIT plugin (aot=0) needs a CUDA build of torch "
                                f"(this torch {torch.__version__} sees no CUDA device); install one "
                                "or export with the AOT plugin (aot=1)")


def _attr_int(value) -> int:
    """One plugin attribute as a Python int: TensorRT passes a one-element int32 array."""
    import numpy as np

    a = np.asarray(value)
    if a.size != 1:
        raise ValueError(f"{PLUGIN_ID}: expected a one-element attribute, got shape {a.shape}")
    return int(a.reshape(-1)[0])


def _target_arch() -> int:
    """sm number (e.g. 90) of the current CUDA device: the GPU TensorRT is building for."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise PluginDepsMissing(f"{PLUGIN_ID} needs cuda-python to find the GPU it compiles "
                                    f"for ({INSTALL_HINT}): {e}") from None
    err, dev = cudart.cudaGetDevice()
    if int(err) == 0:
        err, prop = cudart.cudaGetDeviceProperties(dev)
    if int(err) != 0:
        raise RuntimeError(f"{PLUGIN_ID}: cannot query the CUDA device (cudaError {int(err)})")
    return prop.major * 10 + prop.minor


@functools.lru_cache(maxsize=256)
def _compile_cached(x_dtype, style_dtype, ksize, dilation, padding, demodulate, has_noise,
                    has_bias, activate, config_items, arch) -> CompiledKernel:
    # TensorRT asks for the launch parameters once per tactic, type combination and profile.
    return compile_ptx(x_dtype=x_dtype, style_dtype=style_dtype, ksize=ksize, dilation=dilation,
                       padding=padding, demodulate=demodulate, has_noise=has_noise,
                       has_bias=has_bias, activate=activate, config=dict(config_items), arch=arch)


def _dtype_name(trt, dt) -> str:
    if dt == trt.float32:
        return "float32"
    if dt == trt.float16:
        return "float16"
    raise TypeError(f"{PLUGIN_ID}: unsupported dtype {dt}")


def _define(trt, trtp) -> None:
    import numpy as np
    import numpy.typing as npt

    I32 = npt.NDArray[np.int32]  # how TensorRT's parser hands over an INT attribute (see module docstring)

    @trtp.register(PLUGIN_ID)
    def _desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, style: trtp.TensorDesc,
              noise: trtp.TensorDesc, noise_strength: trtp.TensorDesc, bias: trtp.TensorDesc,
              dilation: I32, padding: I32, demodulate: I32, activate: I32, has_noise: I32,
              has_bias: I32) -> trtp.TensorDesc:
        # ShapeExpr arithmetic takes the int on the right; like() would share x's shape list.
        d, p = _attr_int(dilation), _attr_int(padding)
        shrink = (weight.shape_expr[3] - 1) * d  # d * (k - 1)
        return trtp.from_shape_expr(
            (x.shape_expr[0], weight.shape_expr[0], x.shape_expr[2] + 2 * p - shrink,
             x.shape_expr[3] + 2 * p - shrink), dtype=x.dtype)

    @trtp.autotune(PLUGIN_ID)
    def _autotune(x, weight, style, noise, noise_strength, bias, outputs):
        # Positions: x, weight, style, noise, noise_strength, bias, y. T = x's dtype, S = style's.
        combos = []
        for types in ("FP32, FP32, FP32, FP32, FP32, FP32, FP32",
                      "FP16, FP16, FP32, FP16, FP32, FP16, FP16",
                      "FP16, FP16, FP16, FP16, FP16, FP16, FP16"):
            c = trtp.AutoTuneCombination(types, "LINEAR")
            c.tactics(list(range(1, len(AOT_CONFIGS) + 1)))
            combos.append(c)
        return combos

    @trtp.impl(PLUGIN_ID)
    def _impl(x, weight, style, noise, noise_strength, bias, dilation, padding, demodulate,
              activate, has_noise, has_bias, outputs, stream, tactic):
        import torch

        from kernels.modconv_triton import modulated_conv2d_triton

        with_noise, with_bias = bool(_attr_int(has_noise)), bool(_attr_int(has_bias))
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            t = {n: torch.as_tensor(v, device="cuda") for n, v in dict(
                x=x, weight=weight, style=style, noise=noise, ns=noise_strength, bias=bias,
                y=outputs[0]).items()}
            modulated_conv2d_triton(
                t["x"], t["weight"], t["style"], demodulate=bool(_attr_int(demodulate)),
                dilation=_attr_int(dilation), padding=_attr_int(padding),
                noise=t["noise"] if with_noise else None,
                noise_strength=t["ns"] if with_noise else None, bias=t["bias"] if with_bias else None,
                activate=bool(_attr_int(activate)), out=t["y"], config=AOT_CONFIGS[tactic - 1])

    @trtp.aot_impl(PLUGIN_ID)
    def _aot_impl(x, weight, style, noise, noise_strength, bias, dilation, padding, demodulate,
                  activate, has_noise, has_bias, outputs, tactic: int
                  ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        config = AOT_CONFIGS[tactic - 1]
        y = outputs[0]
        k = weight.shape_expr[3]
        if not k.is_constant:
            raise ValueError(f"{PLUGIN_ID}: the weight's kernel size must be static (got a dynamic dim)")
        kern = _compile_cached(
            _dtype_name(trt, x.dtype), _dtype_name(trt, style.dtype), k.constant_value(),
            _attr_int(dilation), _attr_int(padding), bool(_attr_int(demodulate)),
            bool(_attr_int(has_noise)), bool(_attr_int(has_bias)), bool(_attr_int(activate)),
            tuple(sorted(config.items())), _target_arch())
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(y.shape_expr[2] * y.shape_expr[3], config["BLOCK_M"])
        launch.grid_y = trtp.cdiv(weight.shape_expr[0], config["BLOCK_N"])
        launch.grid_z = y.shape_expr[0]
        launch.block_x = kern.num_warps * 32
        launch.shared_mem = kern.shared
        scalars = extra_scalar_values(x.shape_expr, weight.shape_expr, y.shape_expr)
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in scalars])
        return kern.name, kern.ptx, launch, extra

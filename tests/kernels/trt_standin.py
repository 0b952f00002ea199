"""Run TensorRT's own `tensorrt.plugin` layer on sgex's plugin definitions without TensorRT.

The tensorrt-cu13-bindings wheel holds TensorRT's Python plugin layer (`tensorrt_bindings.plugin`,
pure Python) and its native module (`tensorrt_bindings/tensorrt.so`, pybind11). The native module
links libnvinfer, libnvinfer_plugin and libnvonnxparser and, at import, needs only ten of their
functions (`nm -D --undefined-only tensorrt.so`): the create*_INTERNAL factories,
getPluginRegistry, getBuilderPluginRegistry, initLibNvInferPlugins, getNvOnnxParserVersion.

STAND-INS, built here with gcc/g++ (`build`), loaded under the real libraries' sonames before the
native module (`load`):
  * every function except getPluginRegistry aborts the process with a message: nothing here can
    build, parse or run anything, and a test that reached one of them fails loudly;
  * getPluginRegistry returns a stand-in plugin registry: a C++ object whose virtual functions sit
    in the slot order of nvinfer1::IPluginRegistry (TensorRT 11 headers: setErrorRecorder,
    getErrorRecorder, isParentSearchEnabled, setParentSearchEnabled, loadLibrary,
    deregisterLibrary, registerCreator, getAllCreators, getCreator, deregisterCreator,
    acquirePluginResource, releasePluginResource, getAllCreatorsRecursive, after the destructor).
    registerCreator records (creator, namespace); getCreator hands back the last creator recorded
    for the namespace (no name matching: the checks below register one plugin); every other slot
    aborts.
  * `tensorrt` / `tensorrt.plugin` are aliases of `tensorrt_bindings` / `tensorrt_bindings.plugin`
    (what NVIDIA's tensorrt-cu13 frontend package re-exports);
  * shape expressions: `StandInExprBuilder` subclasses TensorRT's IExprBuilder type and
    `StandInDim` TensorRT's IDimensionExpr type, with no native object behind them. Each carries
    the concrete size at one point of a profile and whether TensorRT would treat it as a build-time
    constant (weights: yes; activations: no). TensorRT's template code stores them into its native
    DimsExprs / ISymExpr slots, which nothing reads back; the checks read the Python side.

What this proves: TensorRT 11.4's own validation (`_validate.py`) and template classes
(`_TemplatePluginCreator`, `_TemplateAOTPlugin`, `_TemplateJITPlugin`) accept sgex's registration
twice in one process, the attribute fields as the ONNX parser passes them (one-element int32
arrays, in the creator's field order) under the installed NumPy, the shape function, the format
and tactic list, and aot_impl's kernel name, PTX, launch parameters and int32 scalar arguments
(for LAUNCH_TACTICS), with the values checked. What it does not prove: that TensorRT builds or runs an engine, that its
C++ side agrees with these expressions, or anything about TensorRT 10.x (not installable here).

`main()` runs in a subprocess of the test (the stand-ins must never enter the pytest process) and
prints one JSON object with what it observed.
"""

# No `from __future__ import annotations`: tensorrt.plugin reads annotations as objects.
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Every function the native module imports from the three libraries (nm -D --undefined-only).
_NVINFER_FUNCS = ("createInferBuilder_INTERNAL", "createInferRefitter_INTERNAL",
                  "createInferRuntime_INTERNAL", "getBuilderPluginRegistry")
_PLUGIN_FUNCS = ("initLibNvInferPlugins",)
_ONNX_FUNCS = ("createNvOnnxParser_INTERNAL", "createNvOnnxParserRefitter_INTERNAL",
               "getNvOnnxParserVersion")

_REGISTRY_SLOTS = (  # after the two destructor slots, in nvinfer1::IPluginRegistry's order
    "setErrorRecorder", "getErrorRecorder", "isParentSearchEnabled", "setParentSearchEnabled",
    "loadLibrary", "deregisterLibrary", "registerCreator", "getAllCreators", "getCreator",
    "deregisterCreator", "acquirePluginResource", "releasePluginResource", "getAllCreatorsRecursive")

# Tactics whose launch parameters are checked: the largest tile and the ToRGB tile (each costs a
# Triton compile of about 5 s of CPU; the PTX of every tactic is covered by the slow PTX test).
LAUNCH_TACTICS = (1, 4)

_ABORT = '{ std::fprintf(stderr, "sgex stand-in: %s was called; the stand-in libraries cannot do it\\n", "NAME"); std::abort(); }'


def _abort_body(name: str) -> str:
    return _ABORT.replace("NAME", name)


def _nvinfer_source() -> str:
    slots = []
    for name in _REGISTRY_SLOTS:
        if name == "registerCreator":
            slots.append("  virtual bool registerCreator(void* creator, const char* ns) {\n"
                         "    if (count < kMax) { creators[count] = creator; namespaces[count] = ns ? ns : \"\"; ++count; }\n"
                         "    return true; }")
        elif name == "getCreator":
            slots.append("  virtual void* getCreator(const char*, const char*, const char* ns) {\n"
                         "    for (int i = count - 1; i >= 0; --i) if (namespaces[i] == (ns ? ns : \"\")) return creators[i];\n"
                         "    return nullptr; }")
        else:
            slots.append(f"  virtual void* {name}(void*, void*) {_abort_body('IPluginRegistry::' + name)}")
    funcs = "\n".join(f'extern "C" void* {f}(void*, void*, void*) {_abort_body(f)}' for f in _NVINFER_FUNCS)
    return f"""// sgex STAND-IN for libnvinfer: see tests/kernels/trt_standin.py. Not TensorRT.
#include <cstdio>
#include <cstdlib>
#include <string>
struct StandInPluginRegistry {{
  static const int kMax = 16;
  void* creators[kMax];
  std::string namespaces[kMax];
  int count = 0;
  virtual ~StandInPluginRegistry() {{}}
{chr(10).join(slots)}
}};
static StandInPluginRegistry registry;
extern "C" void* getPluginRegistry() {{ return &registry; }}
extern "C" int sgex_standin_registered() {{ return registry.count; }}
extern "C" const char* sgex_standin_namespace(int i) {{ return registry.namespaces[i].c_str(); }}
{funcs}
"""


def _c_source(funcs) -> str:
    body = "\n".join(f"void* {f}(void) {{ fprintf(stderr, \"sgex stand-in: {f} was called; the stand-in "
                     f"libraries cannot do it\\n\"); abort(); }}" for f in funcs)
    return "/* sgex STAND-IN: see tests/kernels/trt_standin.py. Not TensorRT. */\n" \
           "#include <stdio.h>\n#include <stdlib.h>\n" + body + "\n"


def bindings_dir() -> Path | None:
    """Directory of the installed tensorrt_bindings package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("tensorrt_bindings")
    return Path(spec.origin).parent if spec and spec.origin else None


def bindings_major(pkg: Path) -> int:
    """TensorRT major version of the bindings (the sonames end in .so.<major>)."""
    m = re.search(r'__version__\s*=\s*"(\d+)\.', (pkg / "__init__.py").read_text())
    if not m:
        raise RuntimeError(f"{pkg}/__init__.py declares no __version__")
    return int(m.group(1))


def missing_tools() -> str | None:
    """Why the stand-ins cannot be built here (None when they can)."""
    if bindings_dir() is None:
        return "tensorrt_bindings is not installed (pip install -c constraints.txt 'sgex[trt-bindings]')"
    for tool in ("gcc", "g++"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (the stand-in libraries are compiled by the test)"
    return None


def build(out: Path, major: int) -> Path:
    """Compile the three stand-in libraries into `out`; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = [("nvinfer", "cpp", _nvinfer_source(), "g++"),
            ("nvinfer_plugin", "c", _c_source(_PLUGIN_FUNCS), "gcc"),
            ("nvonnxparser", "c", _c_source(_ONNX_FUNCS), "gcc")]
    for lib, ext, src, cc in jobs:
        path = out / f"standin_{lib}.{ext}"
        path.write_text(src)
        soname = f"lib{lib}.so.{major}"
        proc = subprocess.run([cc, "-shared", "-fPIC", "-O1", f"-Wl,-soname,{soname}", str(path),
                               "-o", str(out / soname)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {path}:\n{proc.stderr}")
    return out


def load(libdir: Path, major: int):
    """Load the stand-ins, then TensorRT's native module and plugin layer; alias them as
    `tensorrt` / `tensorrt.plugin`. Returns (trt, trtp, the stand-in libnvinfer handle)."""
    handles = [ctypes.CDLL(str(libdir / f"lib{n}.so.{major}"), mode=ctypes.RTLD_GLOBAL)
               for n in ("nvinfer", "nvinfer_plugin", "nvonnxparser")]
    sys.modules["tensorrt_libs"] = None  # where real TensorRT is installed too: never load its libraries
    import tensorrt_bindings

    sys.modules["tensorrt"] = tensorrt_bindings
    import tensorrt_bindings.plugin

    sys.modules["tensorrt.plugin"] = tensorrt_bindings.plugin
    import tensorrt as trt
    import tensorrt.plugin as trtp

    return trt, trtp, handles[0]


# -- stand-in shape expressions ------------------------------------------------------------------
def make_exprs(trt):
    """(StandInExprBuilder, dim) for the loaded tensorrt module; dim(value, constant) makes a
    stand-in IDimensionExpr."""
    ops = trt.DimensionOperation
    fold = {ops.SUM: lambda a, b: a + b, ops.PROD: lambda a, b: a * b, ops.MAX: max, ops.MIN: min,
            ops.SUB: lambda a, b: a - b, ops.EQUAL: lambda a, b: int(a == b),
            ops.LESS: lambda a, b: int(a < b), ops.FLOOR_DIV: lambda a, b: a // b,
            ops.CEIL_DIV: lambda a, b: -(-a // b)}

    class StandInDim(trt.IDimensionExpr):
        def is_constant(self):
            return self.constant

        def get_constant_value(self):
            if not self.constant:
                raise RuntimeError("stand-in: get_constant_value of a non-constant expression")
            return self.value

        def is_size_tensor(self):
            return False

    def dim(value: int, constant: bool):
        d = trt.IDimensionExpr.__new__(StandInDim)  # no native object: nothing native reads it
        d.value, d.constant = int(value), bool(constant)
        return d

    class StandInExprBuilder(trt.IExprBuilder):
        def __init__(self):
            trt.IExprBuilder.__init__(self)

        def constant(self, value):
            return dim(value, True)

        def operation(self, op, a, b):
            return dim(fold[op](a.value, b.value), a.constant and b.constant)

        def declare_size_tensor(self, *args):
            raise RuntimeError("stand-in: sgex's plugin declares no size tensors")

    return StandInExprBuilder, dim


def _dyn_desc(trt, shape, dtype):
    d = trt.DynamicPluginTensorDesc()
    d.desc.dims = trt.Dims(shape)
    d.desc.type = dtype
    d.desc.format = trt.TensorFormat.LINEAR
    d.min = d.max = d.opt = trt.Dims(shape)
    return d


def _plain_desc(trt, shape, dtype):
    d = trt.PluginTensorDesc()
    d.dims = trt.Dims(shape)
    d.type = dtype
    d.format = trt.TensorFormat.LINEAR
    return d


def _values(exprs):
    return [e._expr.value for e in exprs]


def main(libdir: str) -> None:
    import numpy as np

    from kernels import onnx_op, trt_plugin

    pkg = bindings_dir()
    major = bindings_major(pkg)
    trt, trtp, nvinfer = load(Path(libdir), major)
    trt_plugin._target_arch = lambda: 90  # stand-in for the GPU that builds the engine (sm_90)
    report: dict = {"tensorrt_bindings": trt.__version__, "numpy": np.__version__}

    trt_plugin.register()
    trt_plugin.register()
    from tensorrt_bindings.plugin import _lib
    from tensorrt_bindings.plugin._tensor import SymIntExpr

    ns, name = trt_plugin.PLUGIN_ID.split("::")
    nvinfer.sgex_standin_namespace.restype = ctypes.c_char_p
    report["registry"] = [nvinfer.sgex_standin_namespace(i).decode()
                          for i in range(nvinfer.sgex_standin_registered())]
    report["qdp_registry"] = sorted(_lib.QDP_REGISTRY)
    creator = _lib.QDP_CREATORS[trt_plugin.PLUGIN_ID]
    report["creator"] = [type(creator).__name__, creator.name, creator.plugin_namespace]
    report["field_names"] = [(f.name, str(f.type)) for f in creator.field_names]

    # The node as the exporter writes it, its attributes deliberately not in declared order; the
    # fields as onnx-tensorrt's loadFields builds them: creator field order, INT -> int32 x 1.
    node_attrs = dict(has_bias=1, aot=1, plugin_namespace="sgex", dilation=4, activate=0,
                      padding=3, demodulate=1, has_noise=1)
    assert set(node_attrs) == set(onnx_op.ATTRIBUTES)
    report["node_attrs"] = node_attrs
    # PluginField keeps a pointer into the array's buffer, not the array: keep them alive.
    data = [np.array([node_attrs[f.name]], np.int32) for f in creator.field_names]
    fields = trt.PluginFieldCollection([trt.PluginField(f.name, a, trt.PluginFieldType.INT32)
                                        for f, a in zip(creator.field_names, data)])

    B, Cin, Cout, H, W, K = 2, 20, 19, 13, 10, 3
    Ho, Wo = (onnx_op.output_size(s, K, node_attrs["dilation"], node_attrs["padding"]) for s in (H, W))
    T, S = trt.float16, trt.float32  # the FP16 graph: x, weight, noise, bias FP16; style, gain FP32
    shapes = [(B, Cin, H, W), (Cout, Cin, K, K), (B, Cin), (B, 1, Ho, Wo), (1,), (Cout,)]
    types = [T, T, S, T, S, T]
    const = [False, True, False, False, True, True]  # weights are initializers: static shapes
    builder_cls, dim = make_exprs(trt)
    builder = builder_cls()
    in_exprs = [[dim(v, c) for v in s] for s, c in zip(shapes, const)]
    in_out = [_dyn_desc(trt, s, t) for s, t in zip(shapes, types)] + [_dyn_desc(trt, (B, Cout, Ho, Wo), T)]

    for mode, qpcr in (("aot", trt.QuickPluginCreationRequest.STRICT_AOT), ("jit", None)):
        args = (name, ns, fields, trt.TensorRTPhase.BUILD) + ((qpcr,) if qpcr is not None else ())
        plg = creator.create_plugin(*args)
        r = report[mode] = {"class": type(plg).__name__,
                            "attrs": {k: [str(np.asarray(v).dtype), np.asarray(v).tolist()]
                                      for k, v in plg.attrs.items()}}
        r["output_types"] = [str(t) for t in plg.get_output_data_types(types, [len(s) for s in shapes])]
        plg.get_output_shapes(in_exprs, [], builder)
        r["output_shape"] = _values(plg.output_descs[0].shape_expr)
        r["expected_shape"] = [B, Cout, Ho, Wo]
        combos = plg.get_supported_format_combinations(in_out, len(shapes))
        r["n_format_entries"] = len(combos)
        plg.configure_plugin(in_out[:6], in_out[6:])
        r["tactics"] = sorted(plg.get_valid_tactics())
        clone = plg.clone()
        r["clone_class"] = type(clone).__name__
        if mode == "jit":
            r["serialized"] = [(f.name, np.asarray(f.data).tolist()) for f in plg.get_fields_to_serialize()]
            continue
        r["launch"] = {}
        for tactic in LAUNCH_TACTICS:
            plg.set_tactic(tactic)
            launch = type("StandInLaunchParams", (), {})()
            sym = StandInSymExprSetter()
            plg.get_launch_params([], in_out, len(shapes), launch, sym, builder)
            kname, ptx = plg.get_kernel([d.desc for d in in_out[:6]], [in_out[6].desc])
            # aot_impl's own return: the values behind what TensorRT stored natively
            SymIntExpr._exprBuilder = builder
            _, _, params, extra = _lib.QDP_REGISTRY[trt_plugin.PLUGIN_ID].aot_impl_func(
                *plg.input_descs, *plg.attrs.values(), plg.output_descs, tactic)
            SymIntExpr._exprBuilder = None
            ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
            kname = kname.decode() if isinstance(kname, bytes) else kname
            cfg = trt_plugin.AOT_CONFIGS[tactic - 1]
            value = lambda a: getattr(params, a)._expr.value  # noqa: E731
            r["launch"][tactic] = {
                "stored": sorted({k: type(v).__name__ for k, v in vars(launch).items()}.items()),
                "grid": [value("grid_x"), value("grid_y"), value("grid_z")],
                "block": [value("block_x"), value("block_y"), value("block_z")],
                "shared_mem": value("shared_mem"),
                "n_sym": sym.n, "sym_kinds": sym.kinds,
                "extra": _values(extra),
                "expected_extra": [Cin, Cout, H, W, Ho, Wo],
                "expected_grid": [-(-(Ho * Wo) // cfg["BLOCK_M"]), -(-Cout // cfg["BLOCK_N"]), B],
                "expected_block_x": cfg["num_warps"] * 32,
                "kernel_name": kname, "n_ptx_params": len(trt_plugin.entry_params(ptx, kname)),
                "ptx_target": re.search(r"\.target\s+(\w+)", ptx).group(1),
            }
    report["unannotated_aot_impl"] = _unannotated_aot_impl_error(trtp)
    print(json.dumps(report))


def _unannotated_aot_impl_error(trtp) -> str:
    """What TensorRT's validator says about an aot_impl without a return annotation (the defect
    sgex's plugin had): shows that the validation above really ran. Uses its own plugin id."""

    @trtp.register("sgex_standin_check::no_annotation")
    def _desc(x: trtp.TensorDesc) -> trtp.TensorDesc:
        return x.like()

    try:
        @trtp.aot_impl("sgex_standin_check::no_annotation")
        def _aot(x, outputs, tactic):
            raise AssertionError("never called")
    except ValueError as e:
        return str(e)
    return ""


class StandInSymExprSetter:
    """Receives the scalar arguments TensorRT's template hands to its native ISymExprs."""

    def __init__(self):
        self.n, self.kinds = None, []

    @property
    def nbSymExprs(self):
        return self.n

    @nbSymExprs.setter
    def nbSymExprs(self, n):
        self.n = n

    def __setitem__(self, i, value):
        self.kinds.append(type(value).__name__)


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: the stand-in registry holds pointers into Python objects

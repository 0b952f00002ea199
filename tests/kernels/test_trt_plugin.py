"""TensorRT plugin sgex::FusedModulatedConv2d.

CPU (default run): the kernel signature, the PTX that aot_impl hands to TensorRT (compiled for
sm_90 without a GPU, Triton's hidden scratch parameters stripped, the result assembled by Triton's
bundled ptxas), the int scalar order, attribute reading, and the missing-dependency errors.
TensorRT's own plugin layer runs on these definitions in test_trt_plugin_standin.py.

TensorRT (marked trt, skip without it; need a CUDA GPU): engines built from FusedModulatedConv2d
ONNX graphs through the AOT (aot=1) and JIT (aot=0) implementations, run and compared with the
reference, and an AOT engine deserialized and run in a fresh process that never registers the
plugin (the kernel is inside the engine). Written for a TensorRT user to run; not run in this
project, which has no TensorRT.

Tolerances: FP32_REL_TOL / FP16_ABS_TOL as in test_modconv_triton.py (same kernel, same reasoning).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from kernels import trt_plugin  # noqa: E402
from kernels.modconv_triton import KERNEL_ARG_NAMES  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from modconv_cases import FP16_ABS_TOL, FP32_REL_TOL  # noqa: E402
from trt_engine_run import run_engine as _run_engine  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ CPU

def test_kernel_signature_order_and_types():
    sig = trt_plugin.kernel_signature("float16", "float32")
    assert list(sig) == list(KERNEL_ARG_NAMES)
    assert [sig[n] for n in KERNEL_ARG_NAMES] == (
        ["*fp16", "*fp16", "*fp32", "*fp16", "*fp32", "*fp16"] + ["i32"] * 6 + ["*fp16"])
    # The plugin ABI: inputs, then int scalars, then outputs.
    assert list(KERNEL_ARG_NAMES[6:12]) == ["C_in", "C_out", "H", "W", "H_out", "W_out"]


def test_extra_scalars_follow_kernel_order():
    assert trt_plugin.extra_scalar_values((2, 5, 9, 11), (7, 5, 3, 3), (2, 7, 9, 11)) == (5, 7, 9, 11, 9, 11)


_FAKE_PTX = """
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3
)
{
\tld.param.b64 \t%rd1, [k_param_0];
\tld.param.b32 \t%r1, [k_param_1];
BODY
}
"""


def test_strip_hidden_params():
    out = trt_plugin.strip_hidden_params(_FAKE_PTX.replace("BODY", ""), "k", 2)
    assert trt_plugin.entry_params(out, "k") == ["k_param_0", "k_param_1"]
    assert "k_param_2" not in out and "k_param_3" not in out
    with pytest.raises(RuntimeError, match="reads hidden parameter k_param_3"):
        trt_plugin.strip_hidden_params(_FAKE_PTX.replace("BODY", "\tld.param.b64 \t%rd9, [k_param_3];"), "k", 2)
    with pytest.raises(ValueError, match="expected at least 5"):
        trt_plugin.strip_hidden_params(_FAKE_PTX.replace("BODY", ""), "k", 5)


def _ptxas() -> Path | None:
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return p if p.exists() else None


def test_compiled_ptx_has_exactly_the_plugin_parameters(tmp_path):
    cfg = trt_plugin.AOT_CONFIGS[-1]
    k = trt_plugin.compile_ptx(x_dtype="float16", style_dtype="float32", ksize=3, dilation=4,
                               padding=4, demodulate=True, has_noise=True, has_bias=True,
                               activate=True, config=cfg, arch=90)
    params = trt_plugin.entry_params(k.ptx, k.name)
    assert k.n_params == len(KERNEL_ARG_NAMES) == 13
    assert params == [f"{k.name}_param_{i}" for i in range(13)]
    assert re.search(r"\.entry\s+" + k.name + r"\b", k.ptx)
    assert not re.search(k.name + r"_param_1[34]\b", k.ptx)
    assert k.num_warps == cfg["num_warps"] and 0 < k.shared <= trt_plugin.MAX_STATIC_SHARED
    assert ".target sm_90" in k.ptx
    # Every int scalar and pointer is read by the body (none was dropped by mistake).
    for p in params:
        assert re.search(r"ld\.param\.\w+\s+%\w+, \[" + p + r"\]", k.ptx), p
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("triton ships no ptxas here")
    src = tmp_path / "k.ptx"
    src.write_text(k.ptx)
    arch = re.search(r"\.target\s+(sm_\w+)", k.ptx).group(1)  # sm_90a: Triton targets Hopper's "a" ISA
    proc = subprocess.run([str(ptxas), f"-arch={arch}", str(src), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("x_dtype", ["float16", "float32"])
@pytest.mark.parametrize("config", trt_plugin.AOT_CONFIGS, ids=lambda c: "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**c))
def test_every_tactic_compiles_within_static_shared_memory(config, x_dtype):
    k = trt_plugin.compile_ptx(x_dtype=x_dtype, style_dtype="float32", ksize=3, dilation=1,
                               padding=1, demodulate=True, has_noise=True, has_bias=True,
                               activate=True, config=config, arch=90)
    assert k.shared <= trt_plugin.MAX_STATIC_SHARED and k.n_params == 13


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_register_without_tensorrt_names_the_extra():
    with pytest.raises(trt_plugin.TensorRTMissing, match=r"pip install .*sgex\[trt\]"):
        trt_plugin.register()


def test_attr_int_reads_parser_arrays():
    # TensorRT's ONNX parser hands an INT attribute over as a one-element int32 array.
    assert trt_plugin._attr_int(np.array([3], np.int32)) == 3
    assert trt_plugin._attr_int(np.int32(2)) == 2 and trt_plugin._attr_int(5) == 5
    with pytest.raises(ValueError, match="one-element attribute"):
        trt_plugin._attr_int(np.array([1, 2], np.int32))


def test_missing_plugin_dependency_is_one_line():
    with pytest.raises(trt_plugin.PluginDepsMissing) as e:
        trt_plugin._require("sgex_no_such_module", "sgex_no_such_module")
    msg = str(e.value)
    assert "\n" not in msg and "the trt extra does not install" in msg and "sgex[trt,triton,torch]" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_jit_runtime_needs_cuda_torch():
    with pytest.raises(trt_plugin.PluginDepsMissing, match="needs a CUDA build of torch"):
        trt_plugin.require_jit_runtime()


def test_failed_registration_repeats_its_error(monkeypatch):
    import types

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.4.0.106"
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.aot_impl = object()
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(trt_plugin, "_registered", False)
    monkeypatch.setattr(trt_plugin, "_failed", None)

    def half_way(trt, trtp):
        raise ValueError("No return annotation found for aot_impl function")

    monkeypatch.setattr(trt_plugin, "_define", half_way)
    with pytest.raises(ValueError, match="No return annotation"):
        trt_plugin.register()
    with pytest.raises(RuntimeError, match="registration already failed in this process .*No return annotation"):
        trt_plugin.register()


# ------------------------------------------------------------------------------------ TensorRT

def _single_node_model(x_dtype, style_dtype, cin, cout, k, dilation, padding, *, demodulate,
                       activate, has_noise, has_bias, aot, seed=0):
    """A graph with one FusedModulatedConv2d node: inputs x [B,Cin,H,W], style [B,Cin],
    noise [B,1,Ho,Wo]; weight, gain and bias as initializers. Returns (ModelProto, weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kernels import onnx_op

    onnx_op.register_onnx_schema()
    np_t = {"float32": np.float32, "float16": np.float16}
    pt = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np_t[x_dtype])
    bias = rng.standard_normal(cout).astype(np_t[x_dtype]) if has_bias else np.zeros(1, np_t[x_dtype])
    gain = np.array([0.6 if has_noise else 0.0], np_t[style_dtype])
    inits = [numpy_helper.from_array(w, "weight"), numpy_helper.from_array(gain, "gain"),
             numpy_helper.from_array(bias, "bias")]
    node = helper.make_node(
        onnx_op.OP_TYPE, ["x", "weight", "style", "noise", "gain", "bias"], ["y"],
        domain=onnx_op.DOMAIN, dilation=dilation, padding=padding, demodulate=int(demodulate),
        activate=int(activate), has_noise=int(has_noise), has_bias=int(has_bias),
        plugin_namespace=onnx_op.PLUGIN_NAMESPACE, aot=int(aot))
    graph = helper.make_graph(
        [node], "fused_modconv",
        [helper.make_tensor_value_info("x", pt[x_dtype], ["B", cin, "H", "W"]),
         helper.make_tensor_value_info("style", pt[style_dtype], ["B", cin]),
         helper.make_tensor_value_info("noise", pt[x_dtype], ["B", 1, "Ho", "Wo"])],
        [helper.make_tensor_value_info("y", pt[x_dtype], ["B", cout, "Ho", "Wo"])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), onnx_op.opset_import()])
    onnx_op.canonicalize_attributes(model)  # make_node sorted them by name
    onnx.checker.check_model(model)
    return model, dict(weight=w, bias=bias, gain=gain)


def _build_engine(model_bytes, shapes):
    """shapes: {input: (min, opt, max)}. Strongly typed where the TensorRT version has the flag."""
    import tensorrt as trt

    trt_plugin.register()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model_bytes), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    assert blob is not None, "engine build failed"
    return bytes(blob)


def _reference(feeds, weights, x_dtype, *, dilation, padding, demodulate, activate, has_noise, has_bias):
    from kernels.modconv import modulated_conv2d_reference

    f = lambda a: torch.from_numpy(np.asarray(a, np.float32))  # noqa: E731
    return modulated_conv2d_reference(
        f(feeds["x"]), f(weights["weight"]), f(feeds["style"]), demodulate=demodulate,
        dilation=dilation, padding=padding, noise=f(feeds["noise"]) if has_noise else None,
        noise_strength=f(weights["gain"]), bias=f(weights["bias"]) if has_bias else None,
        activate=activate).numpy()


def _case(x_dtype, style_dtype, dilation, k, aot, b=2, cin=20, cout=19, h=13, w=10, flags=None):
    flags = flags or dict(demodulate=True, activate=True, has_noise=True, has_bias=True)
    padding = dilation * (k - 1) // 2
    model, weights = _single_node_model(x_dtype, style_dtype, cin, cout, k, dilation, padding, aot=aot, **flags)
    ho, wo = h + 2 * padding - dilation * (k - 1), w + 2 * padding - dilation * (k - 1)
    rng = np.random.default_rng(1)
    feeds = dict(x=rng.standard_normal((b, cin, h, w)).astype(x_dtype),
                 style=(rng.standard_normal((b, cin)) + 1).astype(style_dtype),
                 noise=rng.standard_normal((b, 1, ho, wo)).astype(x_dtype))
    shapes = {"x": ((1, cin, 1, 1), (b, cin, h, w), (4, cin, 32, 32)),
              "style": ((1, cin), (b, cin), (4, cin)),
              "noise": ((1, 1, 1, 1), (b, 1, ho, wo), (4, 1, 32, 32))}
    ref = _reference(feeds, weights, x_dtype, dilation=dilation, padding=padding, **flags)
    return model, feeds, shapes, ref


def _assert_close(y, ref, x_dtype):
    err = float(np.abs(y.astype(np.float32) - ref).max())
    if x_dtype == "float32":
        assert err / float(np.abs(ref).max()) <= FP32_REL_TOL, err
    else:
        assert err <= FP16_ABS_TOL, err


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.parametrize("aot", [1, 0], ids=["aot", "jit"])
@pytest.mark.parametrize("x_dtype,style_dtype", [("float32", "float32"), ("float16", "float32"),
                                                 ("float16", "float16")])
@pytest.mark.parametrize("dilation,k", [(1, 3), (2, 3), (4, 3), (8, 3), (1, 1)])
def test_engine_matches_reference(dilation, k, x_dtype, style_dtype, aot):
    model, feeds, shapes, ref = _case(x_dtype, style_dtype, dilation, k, aot)
    engine = _build_engine(model.SerializeToString(), shapes)
    _assert_close(_run_engine(engine, feeds), ref, x_dtype)


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.parametrize("aot", [1, 0], ids=["aot", "jit"])
def test_engine_flags_off_torgb(aot):
    flags = dict(demodulate=False, activate=False, has_noise=False, has_bias=True)
    model, feeds, shapes, ref = _case("float16", "float32", 1, 1, aot, cout=3, flags=flags)
    engine = _build_engine(model.SerializeToString(), shapes)
    _assert_close(_run_engine(engine, feeds), ref, "float16")


@pytest.mark.trt
@pytest.mark.gpu
def test_aot_engine_runs_without_the_plugin_registered(tmp_path):
    # The AOT engine carries the PTX: a process that never imports kernels.trt_plugin runs it.
    model, feeds, shapes, ref = _case("float16", "float32", 2, 3, aot=1)
    (tmp_path / "m.engine").write_bytes(_build_engine(model.SerializeToString(), shapes))
    np.savez(tmp_path / "feeds.npz", **feeds)
    script = f"""
import sys, numpy as np
sys.path.insert(0, {str(Path(__file__).parent)!r})
from trt_engine_run import run_engine
feeds = dict(np.load({str(tmp_path / 'feeds.npz')!r}))
y = run_engine(open({str(tmp_path / 'm.engine')!r}, 'rb').read(), feeds)
assert not any(m.startswith("kernels") for m in sys.modules), "the plugin module was imported"
np.save({str(tmp_path / 'y.npy')!r}, y)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_close(np.load(tmp_path / "y.npy"), ref, "float16")


@pytest.mark.trt
@pytest.mark.gpu
def test_exported_plugin_flavor_graph_builds_and_matches(tmp_path):
    # The graph the exporter writes (kernels.onnx_op translation), not a hand-built node.
    from test_onnx_op import TwoConvs, _export, _inputs

    with torch.no_grad():
        model = _export(TwoConvs("plugin"))
        feeds = _inputs(3, 9, 6, seed=4)
        ref = TwoConvs("reference")(*feeds).numpy()
    shapes = {"x": ((1, 5, 4, 4), (3, 5, 9, 6), (4, 5, 16, 16)), "w": ((1, 4), (3, 4), (4, 4)),
              "noise": ((1, 1, 4, 4), (3, 1, 9, 6), (4, 1, 16, 16))}
    engine = _build_engine(model.SerializeToString(), shapes)
    y = _run_engine(engine, {n: t.numpy() for n, t in zip(("x", "w", "noise"), feeds)})
    _assert_close(y, ref, "float32")

"""The FusedModulatedConv2d ONNX node: custom op, dynamo export with the translation table,
onnx.checker, ONNX Runtime (onnxruntime-extensions Python op) against the reference, and the
portable flavor of the same module.

Tolerance: ONNX_TOL = 1e-5 relative to max(1, max|reference|). The ORT op accumulates in float64
and the reference in float32 over at most Cin*k*k = 45 unit-scale products, so the expected gap is a
few float32 ulps of the output (~1e-6 at this scale); 1e-5 leaves 10x headroom and still fails on
any wrong tap, flag or epilogue term (those move outputs by O(0.1))."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_extensions")
pytest.importorskip("onnxscript")

from kernels import onnx_op  # noqa: E402
from kernels.modconv import modulated_conv2d, modulated_conv2d_reference  # noqa: E402

ONNX_TOL = 1e-5


def _close(a, ref, tol=ONNX_TOL):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    err = np.abs(a - ref).max() / max(1.0, np.abs(ref).max())
    assert err <= tol, f"rel err {err:.3g} > {tol}"
    return err


class TwoConvs(torch.nn.Module):
    """A dilated 3x3 modulated conv with noise + bias + activation, then a 1x1 ToRGB-like conv
    (no demod, no activation, no noise, no bias): both placeholder paths of the node."""

    def __init__(self, impl: str, cin=5, cmid=6, cout=3, wdim=4, dilation=2):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.impl = impl
        self.dilation = dilation
        self.w1 = torch.nn.Parameter(torch.randn(cmid, cin, 3, 3, generator=g) / 3)
        self.w2 = torch.nn.Parameter(torch.randn(cout, cmid, 1, 1, generator=g) / 3)
        self.a1 = torch.nn.Parameter(torch.randn(cin, wdim, generator=g) / 2)
        self.a2 = torch.nn.Parameter(torch.randn(cmid, wdim, generator=g) / 2)
        self.noise_strength = torch.nn.Parameter(torch.tensor([0.3]))
        self.bias = torch.nn.Parameter(torch.randn(cmid, generator=g))

    def forward(self, x, w, noise):
        y = modulated_conv2d(x, self.w1, w @ self.a1.t() + 1, dilation=self.dilation, noise=noise,
                             noise_strength=self.noise_strength, bias=self.bias, impl=self.impl)
        return modulated_conv2d(y, self.w2, w @ self.a2.t(), demodulate=False, activate=False,
                                impl=self.impl)


def _inputs(b, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 5, h, w, generator=g), torch.randn(b, 4, generator=g),
            torch.randn(b, 1, h, w, generator=g))


def _export(module):
    dim_b, dim_h, dim_w = (torch.export.Dim(n, min=1, max=64) for n in ("batch", "height", "width"))
    program = torch.onnx.export(
        module, _inputs(2, 7, 9, 0), dynamo=True, input_names=["x", "w", "noise"], output_names=["y"],
        dynamic_shapes={"x": {0: dim_b, 2: dim_h, 3: dim_w}, "w": {0: dim_b},
                        "noise": {0: dim_b, 2: dim_h, 3: dim_w}},
        custom_translation_table=onnx_op.onnx_translation_table(), verbose=False,
    )
    onnx_op.canonicalize_attributes(program)
    return program.model_proto


def _run(model_proto, feeds, plugin: bool):
    so = onnx_op.ort_session_options() if plugin else ort.SessionOptions()
    sess = ort.InferenceSession(model_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


@pytest.fixture(scope="module")
def exported():
    with torch.no_grad():
        return {"plugin": _export(TwoConvs("plugin")), "portable": _export(TwoConvs("reference"))}


def test_plugin_graph_is_one_node_per_conv(exported):
    model = exported["plugin"]
    onnx.checker.check_model(model, full_check=True)
    fused = [n for n in model.graph.node if n.op_type == onnx_op.OP_TYPE]
    assert len(fused) == 2 and all(n.domain == onnx_op.DOMAIN for n in fused)
    assert not [n for n in model.graph.node if n.op_type == "Conv"]
    assert any(o.domain == onnx_op.DOMAIN and o.version == onnx_op.DOMAIN_VERSION for o in model.opset_import)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in fused]
    # TensorRT's AOT path passes attributes positionally: the order is part of the contract.
    assert all([a.name for a in n.attribute] == list(onnx_op.ATTRIBUTES) for n in fused)
    assert attrs[0] == dict(dilation=2, padding=2, demodulate=1, activate=1, has_noise=1, has_bias=1,
                            plugin_namespace=b"sgex", aot=1)
    assert attrs[1] == dict(dilation=1, padding=0, demodulate=0, activate=0, has_noise=0, has_bias=0,
                            plugin_namespace=b"sgex", aot=1)
    # Weights travel as initializers, not as graph inputs.
    inits = {i.name for i in model.graph.initializer}
    assert fused[0].input[1] in inits and fused[1].input[1] in inits
    assert [i.name for i in model.graph.input] == ["x", "w", "noise"]


@pytest.mark.parametrize("b,h,w", [(1, 5, 8), (3, 9, 6)])
def test_plugin_and_portable_match_reference_on_ort(exported, b, h, w):
    x, wv, noise = feeds = _inputs(b, h, w, seed=b * 100 + h)
    with torch.no_grad():
        ref = TwoConvs("reference")(*feeds).numpy()
    named = dict(x=x, w=wv, noise=noise)
    plugin = _run(exported["plugin"], named, plugin=True)
    portable = _run(exported["portable"], named, plugin=False)
    _close(plugin, ref)
    _close(portable, ref)
    _close(plugin, portable)


def test_eager_plugin_impl_equals_reference():
    feeds = _inputs(2, 6, 7, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(TwoConvs("plugin")(*feeds), TwoConvs("reference")(*feeds),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("dilation", [1, 2, 4, 8])
@pytest.mark.parametrize("flags", [(True, True, True, True), (False, False, False, False),
                                   (True, False, True, False), (False, True, False, True)])
def test_numpy_op_equals_reference(dilation, flags):
    demod, has_noise, has_bias, act = flags
    g = torch.Generator().manual_seed(dilation)
    x = torch.randn(2, 4, 6, 11, generator=g)
    wt = torch.randn(5, 4, 3, 3, generator=g)
    st = torch.randn(2, 4, generator=g)
    noise = torch.randn(2, 1, 6, 11, generator=g)
    ns = torch.tensor([0.7])
    bias = torch.randn(5, generator=g)
    ref = modulated_conv2d_reference(
        x, wt, st, demodulate=demod, dilation=dilation, padding=dilation,
        noise=noise if has_noise else None, noise_strength=ns, bias=bias if has_bias else None,
        activate=act)
    out = onnx_op.fused_modconv_numpy(
        x.numpy(), wt.numpy(), st.numpy(), noise.numpy(), ns.numpy(), bias.numpy(),
        dilation=dilation, padding=dilation, demodulate=demod, activate=act, has_noise=has_noise,
        has_bias=has_bias)
    _close(out, ref.numpy())


def test_canonicalize_attributes_on_a_proto():
    node = onnx.helper.make_node(  # make_node sorts attributes by name
        onnx_op.OP_TYPE, list(onnx_op.INPUT_NAMES), ["y"], domain=onnx_op.DOMAIN, dilation=2,
        padding=2, demodulate=1, activate=1, has_noise=0, has_bias=1,
        plugin_namespace=onnx_op.PLUGIN_NAMESPACE, aot=1)
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [], []))
    assert [a.name for a in node.attribute] != list(onnx_op.ATTRIBUTES)
    assert onnx_op.canonicalize_attributes(model) == 1
    got = model.graph.node[0].attribute
    assert [a.name for a in got] == list(onnx_op.ATTRIBUTES)
    assert [onnx.helper.get_attribute_value(a) for a in got][:6] == [2, 2, 1, 1, 0, 1]
    del model.graph.node[0].attribute[-1]
    with pytest.raises(ValueError, match="expected"):
        onnx_op.canonicalize_attributes(model)


def test_torch_op_fake_shape_and_padding():
    op = onnx_op.torch_op()
    x = torch.randn(1, 3, 9, 10, device="meta")
    y = op(x, torch.randn(4, 3, 3, 3, device="meta"), torch.randn(1, 3, device="meta"),
           None, None, None, 4, 1, True, True)
    assert tuple(y.shape) == (1, 4, 9 + 2 - 8, 10 + 2 - 8)
    assert onnx_op.output_size(12, 3, 8, 8) == 12


def test_ort_side_imports_without_torch():
    # runtime/ must run plugin-flavor graphs on ONNX Runtime without torch installed.
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'triton', 'onnxscript'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from kernels.onnx_op import ort_session_options\n"
        "ort_session_options()\n"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

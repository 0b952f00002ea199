"""The fused modulated convolution as ONE ONNX node, its PyTorch custom op, and its ONNX Runtime op.

Node (one per modulated conv, written by the dynamo exporter through `onnx_translation_table()`):

    domain ai.onnx.contrib, version 1, op_type FusedModulatedConv2d
    inputs   x            T [B, Cin, H, W]
             weight       T [Cout, Cin, k, k]      (initializer: already scaled, conv layout)
             style        S [B, Cin]
             noise        T [B, 1, Ho, Wo]         (a [1, 1, 1, 1] zero placeholder when has_noise=0)
             noise_strength S [1] or []            (a [1] zero placeholder when has_noise=0)
             bias         T [Cout]                 (a [1] zero placeholder when has_bias=0)
    output   y            T [B, Cout, Ho, Wo],  Ho = H + 2*padding - dilation*(k-1) (same for W)
    attrs    dilation:int, padding:int, demodulate:int 0/1, activate:int 0/1,
             has_noise:int 0/1, has_bias:int 0/1,
             plugin_namespace:string "sgex"  (TensorRT plugin lookup: sgex::FusedModulatedConv2d),
             aot:int 1                       (TensorRT >= 10.9 picks the ahead-of-time implementation)
    T in {float, float16}; S in {float, float16}  (the FP16 plan keeps style vectors FP32)
    (T, S) pairs the TensorRT plugin accepts: (float, float), (float16, float), (float16, float16)

Semantics are `kernels.modconv.modulated_conv2d_reference`. Every input is always present: the
onnxruntime-extensions Python op and a TensorRT plugin both have a fixed input list, so optional
operands travel as placeholders plus the has_noise / has_bias flags instead of empty inputs.

Pieces, each imported lazily so `runtime` can use the ONNX Runtime side without torch:
  `torch_op()`               -> torch.ops.sgex.fused_modconv.default (registers on first call;
                                CPU/CUDA/Meta impl = the reference) -- used by impl="plugin"
  `onnx_translation_table()` -> {torch op: onnxscript function} for torch.onnx.export(dynamo=True)
  `register_onnx_schema()`   -> registers the node's OpSchema with `onnx.defs` (onnx.checker then
                                validates arity, types and attributes of the node)
  `canonicalize_attributes(program)` -> puts every node's attributes in ATTRIBUTES order.
                                The exporter writes them in an arbitrary order, and TensorRT's AOT
                                plugin path hands attributes to the kernel compiler positionally
                                in node order: call it on every exported plugin-flavor
                                ONNXProgram (or ModelProto) before saving.
  `opset_import()`           -> OperatorSetIdProto(ai.onnx.contrib, 1)
  `ort_session_options()`    -> onnxruntime.SessionOptions with the onnxruntime-extensions library
                                and the Python implementation of the node registered
  `fused_modconv_numpy(...)` -> the reference in numpy (float64 accumulation), what the ORT op runs

The ORT Python op is a correctness path, not a fast one: onnxruntime-extensions marshals every
output through a Python list, and it is registered for float32 tensors only (an FP16 plugin graph
is meant for TensorRT; run the FP32 plugin graph or the portable graph on ONNX Runtime).
"""

from __future__ import annotations

import threading

__all__ = [
    "DOMAIN",
    "DOMAIN_VERSION",
    "OP_TYPE",
    "PLUGIN_NAMESPACE",
    "TORCH_OP",
    "ATTRIBUTES",
    "torch_op",
    "onnx_translation_table",
    "register_onnx_schema",
    "opset_import",
    "ort_session_options",
    "fused_modconv_numpy",
    "output_size",
    "canonicalize_attributes",
]

DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' default custom-op domain
DOMAIN_VERSION = 1
OP_TYPE = "FusedModulatedConv2d"
PLUGIN_NAMESPACE = "sgex"  # TensorRT plugin id: "sgex::FusedModulatedConv2d"
TORCH_OP = "sgex::fused_modconv"
INPUT_NAMES = ("x", "weight", "style", "noise", "noise_strength", "bias")
# Every attribute is written on every node, in this order (see canonicalize_attributes); the ORT
# op declares the same set; trt_plugin's functions take the first six in this order.
ATTRIBUTES = ("dilation", "padding", "demodulate", "activate", "has_noise", "has_bias",
              "plugin_namespace", "aot")

_LRELU_SLOPE = 0.2  # same constants as kernels.modconv (kept numeric here: no torch import)
_LRELU_GAIN = 2.0 ** 0.5
_DEMOD_EPS = 1e-8

_TORCH_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor style, Tensor? noise, Tensor? noise_strength, Tensor? bias, "
    "int dilation, int padding, bool demodulate, bool activate) -> Tensor"
)

_lock = threading.Lock()
_torch_op = None
_ort_registered = False


def output_size(size: int, k: int, dilation: int, padding: int) -> int:
    """Output extent of a stride-1 conv: size + 2*padding - dilation*(k-1)."""
    return size + 2 * padding - dilation * (k - 1)


# --------------------------------------------------------------------------------------------
# PyTorch custom op (what impl="plugin" calls; the exporter sees one opaque call per conv)
# --------------------------------------------------------------------------------------------

def torch_op():
    """Register `sgex::fused_modconv` once and return its OpOverload.

    Schema `_TORCH_SCHEMA`: (x, weight, style, noise?, noise_strength?, bias?, int dilation,
    int padding, bool demodulate, bool activate) -> Tensor. `padding` is explicit (no "same"
    default inside the op)."""
    global _torch_op
    with _lock:
        if _torch_op is not None:
            return _torch_op
        import torch

        from kernels.modconv import modulated_conv2d_reference

        # The schema is spelled out: annotations are strings under `from __future__ import annotations`.
        @torch.library.custom_op(TORCH_OP, mutates_args=(), schema=_TORCH_SCHEMA)
        def fused_modconv(x, weight, style, noise, noise_strength, bias, dilation, padding,
                          demodulate, activate):
            return modulated_conv2d_reference(
                x, weight, style, demodulate=demodulate, dilation=dilation, padding=padding,
                noise=noise, noise_strength=noise_strength, bias=bias, activate=activate,
            )

        @fused_modconv.register_fake
        def _(x, weight, style, noise, noise_strength, bias, dilation, padding, demodulate, activate):
            k = weight.shape[-1]
            ho = output_size(x.shape[2], k, dilation, padding)
            wo = output_size(x.shape[3], k, dilation, padding)
            return x.new_empty((x.shape[0], weight.shape[0], ho, wo))

        _torch_op = torch.ops.sgex.fused_modconv.default
        return _torch_op


# --------------------------------------------------------------------------------------------
# ONNX schema and the exporter's translation
# --------------------------------------------------------------------------------------------

def register_onnx_schema() -> None:
    """Register the node's OpSchema with onnx (idempotent). After this onnx.checker checks the
    node's inputs, type constraints and attributes instead of skipping an unknown op, and
    onnxscript can build the node."""
    import onnx
    from onnx import defs

    with _lock:
        try:
            defs.get_schema(OP_TYPE, DOMAIN_VERSION, DOMAIN)
            return
        except defs.SchemaError:
            pass
        P = defs.OpSchema.FormalParameter
        A = defs.OpSchema.Attribute
        AT = defs.OpSchema.AttrType
        schema = defs.OpSchema(
            OP_TYPE, DOMAIN, DOMAIN_VERSION,
            doc="y = act(demod * conv(x * style, weight) + noise_strength * noise + bias); "
                "see kernels/modconv.py",
            inputs=[
                P("x", "T", "[B, Cin, H, W]"),
                P("weight", "T", "[Cout, Cin, k, k]"),
                P("style", "S", "[B, Cin]"),
                P("noise", "T", "[B, 1, Ho, Wo] (placeholder if has_noise=0)"),
                P("noise_strength", "S", "[1] (placeholder if has_noise=0)"),
                P("bias", "T", "[Cout] (placeholder if has_bias=0)"),
            ],
            outputs=[P("y", "T", "[B, Cout, Ho, Wo]")],
            type_constraints=[
                ("T", ["tensor(float)", "tensor(float16)"], "feature maps and weights"),
                ("S", ["tensor(float)", "tensor(float16)"], "style vector and noise gain"),
            ],
            attributes=[
                A("dilation", AT.INT, "conv dilation (1, 2, 4, 8 in the generator)"),
                A("padding", AT.INT, "symmetric zero padding"),
                A("demodulate", AT.INT, "0/1"),
                A("activate", AT.INT, "0/1: leaky ReLU 0.2 times sqrt(2)"),
                A("has_noise", AT.INT, "0/1: noise and noise_strength are real"),
                A("has_bias", AT.INT, "0/1: bias is real"),
                A("plugin_namespace", onnx.helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
                  "TensorRT plugin namespace"),
                A("aot", onnx.helper.make_attribute("aot", 1),
                  "1: TensorRT uses the ahead-of-time plugin implementation"),
            ],
        )
        defs.register_schema(schema)


def canonicalize_attributes(model) -> int:
    """Reorder, in place, the attributes of every FusedModulatedConv2d node to ATTRIBUTES order and
    check that each node has exactly that set. Returns the number of nodes touched.

    `model`: the torch.onnx.ONNXProgram (its in-memory IR is edited, so a later program.save() or
    program.model_proto carries the order), an onnx_ir Model, or an onnx.ModelProto (edited in
    place; note that ONNXProgram.model_proto builds a new proto on every access). Main graph,
    subgraphs and local functions are all visited."""
    import onnx

    def reorder(names: list, node_name: str, pop, put) -> None:
        if set(names) != set(ATTRIBUTES) or len(names) != len(ATTRIBUTES):
            raise ValueError(f"{OP_TYPE} node {node_name!r} has attributes {sorted(names)}, "
                             f"expected {sorted(ATTRIBUTES)}")
        for a in [pop(n) for n in ATTRIBUTES]:
            put(a)

    if isinstance(model, onnx.ModelProto):
        def graphs(g):
            yield g
            for node in g.node:
                for a in node.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        yield from graphs(a.g)
                    elif a.type == onnx.AttributeProto.GRAPHS:
                        for sub in a.graphs:
                            yield from graphs(sub)

        nodes = [n for g in graphs(model.graph) for n in g.node] + [n for f in model.functions for n in f.node]
        count = 0
        for node in nodes:
            if node.op_type == OP_TYPE and node.domain == DOMAIN:
                by_name = {a.name: onnx.AttributeProto.FromString(a.SerializeToString()) for a in node.attribute}
                del node.attribute[:]
                reorder(list(by_name), node.name, by_name.pop, node.attribute.append)
                count += 1
        return count

    from onnxscript import ir

    ir_model = getattr(model, "model", model)  # ONNXProgram -> its ir.Model
    nodes = list(ir.traversal.RecursiveGraphIterator(ir_model.graph))
    for fn in ir_model.functions.values():
        nodes += list(ir.traversal.RecursiveGraphIterator(fn))
    count = 0
    for node in nodes:
        if node.op_type == OP_TYPE and node.domain == DOMAIN:
            attrs = node.attributes
            reorder(list(attrs), node.name, attrs.pop, lambda a, attrs=attrs: attrs.__setitem__(a.name, a))
            count += 1
    return count


def opset_import():
    """The opset import a graph holding the node needs: onnx.OperatorSetIdProto(ai.onnx.contrib, 1).
    The dynamo exporter writes it by itself; this is for graphs assembled by hand."""
    import onnx

    return onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION)


def onnx_translation_table() -> dict:
    """{torch.ops.sgex.fused_modconv.default: onnxscript function} for
    `torch.onnx.export(..., dynamo=True, custom_translation_table=onnx_translation_table())`.

    Each call becomes exactly one FusedModulatedConv2d node; absent noise / bias become small
    zero Constants of the right dtype with has_noise / has_bias = 0. The exporter does not keep
    the attribute order: run `canonicalize_attributes(program)` on the returned ONNXProgram
    before saving it (TensorRT's AOT path needs ATTRIBUTES order)."""
    import numpy as np
    import onnxscript
    from onnxscript import ir
    from onnxscript import opset18 as op

    register_onnx_schema()
    contrib = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

    def _zeros(shape, like):
        return op.Constant(value=ir.tensor(np.zeros(shape, dtype=like.dtype.numpy())))

    def fused_modconv(x, weight, style, noise=None, noise_strength=None, bias=None,
                      dilation: int = 1, padding: int = 0, demodulate: bool = True,
                      activate: bool = True):
        has_noise = noise is not None
        has_bias = bias is not None
        if has_noise and noise_strength is None:
            noise_strength = op.Constant(value=ir.tensor(np.ones((1,), dtype=style.dtype.numpy())))
        if not has_noise:
            noise = _zeros((1, 1, 1, 1), x)
            noise_strength = _zeros((1,), style)
        if not has_bias:
            bias = _zeros((1,), x)
        return contrib.FusedModulatedConv2d(
            x, weight, style, noise, noise_strength, bias,
            dilation=int(dilation), padding=int(padding), demodulate=int(bool(demodulate)),
            activate=int(bool(activate)), has_noise=int(has_noise), has_bias=int(has_bias),
            plugin_namespace=PLUGIN_NAMESPACE, aot=1,
        )

    return {torch_op(): fused_modconv}


# --------------------------------------------------------------------------------------------
# ONNX Runtime: onnxruntime-extensions Python op
# --------------------------------------------------------------------------------------------

def fused_modconv_numpy(x, weight, style, noise, noise_strength, bias, *, dilation: int,
                        padding: int, demodulate: bool, activate: bool, has_noise: bool,
                        has_bias: bool):
    """The reference (kernels.modconv.modulated_conv2d_reference) in numpy, accumulated in float64,
    returned as float32. Shapes as in the node description above."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    s = np.asarray(style, dtype=np.float64)
    b, cin, h, wd = x.shape
    cout, k = w.shape[0], w.shape[-1]
    if w.shape[1] != cin or s.shape != (b, cin):
        raise ValueError(f"{OP_TYPE}: x {x.shape}, weight {w.shape}, style {s.shape} disagree")
    ho, wo = output_size(h, k, dilation, padding), output_size(wd, k, dilation, padding)
    xm = x * s[:, :, None, None]
    xp = np.pad(xm, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    y = np.zeros((cout, b, ho, wo), dtype=np.float64)  # [Cout, B, Ho, Wo]: tensordot's layout
    for kh in range(k):
        for kw in range(k):
            patch = xp[:, :, kh * dilation: kh * dilation + ho, kw * dilation: kw * dilation + wo]
            y += np.tensordot(w[:, :, kh, kw], patch, axes=([1], [1]))
    y = y.transpose(1, 0, 2, 3)
    if demodulate:
        wsq = np.square(w).sum(axis=(2, 3))  # [Cout, Cin]
        y = y / np.sqrt(np.square(s) @ wsq.T + _DEMOD_EPS)[:, :, None, None]
    if has_noise:
        y = y + np.asarray(noise_strength, dtype=np.float64).reshape(()) * np.asarray(noise, dtype=np.float64)
    if has_bias:
        y = y + np.asarray(bias, dtype=np.float64)[None, :, None, None]
    if activate:
        y = np.where(y >= 0, y, y * _LRELU_SLOPE) * _LRELU_GAIN
    return y.astype(np.float32)


def _register_ort_op() -> None:
    global _ort_registered
    with _lock:
        if _ort_registered:
            return
        from onnxruntime_extensions import PyCustomOpDef, onnx_op

        int_attrs = {a: PyCustomOpDef.dt_int64 for a in ATTRIBUTES if a != "plugin_namespace"}
        int_attrs["plugin_namespace"] = PyCustomOpDef.dt_string

        @onnx_op(op_type=OP_TYPE, inputs=[PyCustomOpDef.dt_float] * len(INPUT_NAMES),
                 outputs=[PyCustomOpDef.dt_float], attrs=int_attrs)
        def _fused_modulated_conv2d(x, weight, style, noise, noise_strength, bias, **attrs):
            return fused_modconv_numpy(
                x, weight, style, noise, noise_strength, bias,
                dilation=int(attrs["dilation"]), padding=int(attrs["padding"]),
                demodulate=bool(attrs["demodulate"]), activate=bool(attrs["activate"]),
                has_noise=bool(attrs["has_noise"]), has_bias=bool(attrs["has_bias"]),
            )

        _ort_registered = True


def ort_session_options(base=None):
    """onnxruntime.SessionOptions (a new one, or `base` updated in place) with the
    onnxruntime-extensions library and the FusedModulatedConv2d Python op registered."""
    try:
        import onnxruntime as ort
        from onnxruntime_extensions import get_library_path
    except ImportError as e:
        raise ImportError(
            "the FusedModulatedConv2d ONNX Runtime op needs onnxruntime and onnxruntime-extensions "
            "(pip install -c constraints.txt 'sgex[onnx]')"
        ) from e
    _register_ort_op()
    so = ort.SessionOptions() if base is None else base
    so.register_custom_ops_library(get_library_path())
    return so

"""The fused modulated dilated convolution: reference (modconv.py), Triton kernel
(modconv_triton.py), ONNX custom op (onnx_op.py) and TensorRT plugin (trt_plugin.py).
Imports nothing from the rest of sgex."""

"""Run a serialized TensorRT engine on numpy feeds (output tensor "y"). Imports nothing from sgex,
so test_trt_plugin.py can run an AOT engine in a process where the plugin was never registered."""

from __future__ import annotations

import numpy as np


def run_engine(engine_bytes: bytes, feeds: dict) -> np.ndarray:
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    assert engine is not None, "engine deserialization failed"
    ctx = engine.create_execution_context()
    keep = {}
    for name, arr in feeds.items():
        t = torch.from_numpy(np.ascontiguousarray(arr)).cuda()
        keep[name] = t
        assert ctx.set_input_shape(name, tuple(t.shape)), name
        assert ctx.set_tensor_address(name, t.data_ptr()), name
    dtype = {trt.float32: torch.float32, trt.float16: torch.float16}[engine.get_tensor_dtype("y")]
    y = torch.empty(tuple(ctx.get_tensor_shape("y")), dtype=dtype, device="cuda")
    assert ctx.set_tensor_address("y", y.data_ptr())
    # A stream of its own: TensorRT warns about, and synchronizes extra on, the legacy default
    # stream. It waits for the uploads queued on torch's current stream first.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return y.cpu().numpy()

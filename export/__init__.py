"""The PyTorch reference model (networks.py), official checkpoint loading (checkpoint.py) and every
conversion: per-bucket ONNX (onnx.py) and TensorRT engines (engine.py); CLI `sgex-export`."""

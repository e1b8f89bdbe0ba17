"""nenni-deploy: NENNI (noise into non-essential neurons) from PyTorch to ONNX Runtime and TensorRT."""

__version__ = "0.1.0"

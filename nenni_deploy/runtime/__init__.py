"""Running exported models: checked loading, Runners (ONNX Runtime, PyTorch, any ONNX image classifier), batching,
parity checks."""

from __future__ import annotations

from .classifier import ClassifierSpec, OnnxClassifier, PixelConvention, open_classifier
from .loading import InputSpec, LoadedModel, check_proto, load_onnx_checked
from .predict import accuracy, predict_dataset
from .runners import (
    PROVIDERS,
    OrtRunner,
    Runner,
    RuntimeFallbackWarning,
    TorchRunner,
    open_runner,
    validate_input,
)

__all__ = [
    "PROVIDERS",
    "ClassifierSpec",
    "OnnxClassifier",
    "PixelConvention",
    "open_classifier",
    "open_runner",
    "InputSpec",
    "LoadedModel",
    "OrtRunner",
    "Runner",
    "RuntimeFallbackWarning",
    "TorchRunner",
    "accuracy",
    "check_proto",
    "load_onnx_checked",
    "predict_dataset",
    "validate_input",
]

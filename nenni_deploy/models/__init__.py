"""Model families by name: `create_model("resnet20", weights=...)`; importing registers every family."""

from __future__ import annotations

from nenni_deploy.models import abcrown, cifar_resnet, preact_resnet, small_cnn, wide_resnet  # noqa: F401
from nenni_deploy.models.checkpoint import load_checkpoint, save_state_dict
from nenni_deploy.models.layers import Normalize
from nenni_deploy.models.registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = [
    "ModelInfo",
    "Normalize",
    "create_model",
    "list_models",
    "load_checkpoint",
    "model_info",
    "register_model",
    "save_state_dict",
]

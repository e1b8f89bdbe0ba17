"""Helpers shared by the export and runtime tests (no tests here): small fitted NENNI models and ORT runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from _nets import tiny_net

from nenni_deploy.data import load_dataset
from nenni_deploy.models import create_model
from nenni_deploy.nenni import convert, fit
from nenni_deploy.nenni.config import NenniConfig
from nenni_deploy.nenni.io import projection_hash

TINY_SHAPE = (3, 12, 12)
DIGITS_SHAPE = (1, 8, 8)


def card_for(model, config: NenniConfig, specs, arch: str, data: str = "") -> dict:
    return {
        "arch": arch,
        "nenni": config.to_dict(),
        "layers": [s.to_dict() for s in specs],
        "weights_sha256": "0" * 64,
        "projection_sha256": projection_hash(model),
        "metrics": {"data": data},
    }


def tiny_nenni(granularity: str = "channel", noise: str = "none", seed: int = 0, **kw):
    """TinyNet (a residual block, a strided conv, a NENNI linear layer) converted and fitted; (model, card)."""
    net = tiny_net(seed)
    kw.setdefault("proj_dim", "n/2")
    kw.setdefault("ratio", 0.5)
    config = NenniConfig(granularity=granularity, noise=noise, nm=(2, 4), **kw)
    specs = convert.convert(net, config)
    x = torch.rand(96, *TINY_SHAPE, generator=torch.Generator().manual_seed(seed))
    fit.fit(net, [x[:48], x[48:]], progress=False)
    return net, card_for(net, config, specs, "tiny_net")


def small_cnn_nenni(granularity: str = "channel", noise: str = "none", **kw):
    """The registered small_cnn (digits), converted and fitted on 256 training images; (model, card)."""
    torch.manual_seed(0)
    model = create_model("small_cnn")
    kw.setdefault("proj_dim", "n/2")
    kw.setdefault("ratio", 0.5)
    config = NenniConfig(granularity=granularity, noise=noise, **kw)
    specs = convert.convert(model, config)
    x = load_dataset("digits", "train").x[:256]
    fit.fit(model, [x[:128], x[128:]], progress=False)
    return model, card_for(model, config, specs, "small_cnn", "digits"), config, specs


def session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(proto: onnx.ModelProto, x: torch.Tensor | np.ndarray, sess: ort.InferenceSession | None = None) -> np.ndarray:
    sess = sess or session(proto)
    x = x.numpy() if isinstance(x, torch.Tensor) else x
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]

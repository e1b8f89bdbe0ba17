"""The Triton kernels of the TensorRT plugins, run on the CPU by Triton's interpreter and held to the PyTorch
reference of the op (`nenni.layers`): every granularity and ranking, conv and linear, and the noise generator's
device-side counter. Skips where Triton is not installed (it comes with the `tensorrt` extra)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: kernels run on the CPU here

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[tensorrt]')")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)

from test_export_support import TINY_SHAPE, tiny_nenni  # noqa: E402

from nenni_deploy.nenni.layers import nenni_layers  # noqa: E402
from nenni_deploy.nenni.selection import ranking_score, select  # noqa: E402
from nenni_deploy.runtime.tensorrt import kernels  # noqa: E402
from nenni_deploy.runtime.tensorrt.launch import LayerAttrs  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _layer_inputs(model, x):
    """Each NENNI layer's input on a real forward pass (so the scores have realistic structure)."""
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen.setdefault(name, args[0].detach())

        return hook

    hooks = [layer.register_forward_hook(keep(name)) for name, layer in nenni_layers(model).items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _attrs(layer) -> LayerAttrs:
    s = layer.spec
    geometry = {}
    if layer.is_conv:
        c = layer.exact
        ph, pw = c.padding
        geometry = dict(strides=list(c.stride), pads=[ph, pw, ph, pw], dilations=list(c.dilation))
    return LayerAttrs.parse(
        granularity=s.granularity, rank=s.rank, k=s.essential, nm=list(s.nm or (4, 8)),
        threshold=float(s.threshold or 0.0), **geometry,
    )  # fmt: skip


@pytest.mark.parametrize("granularity", ["channel", "element", "nm", "threshold"])
def test_layer_kernels_match_the_reference(granularity):
    model, _ = tiny_nenni(granularity)
    x = torch.rand(3, *TINY_SHAPE, generator=torch.Generator().manual_seed(3))
    inputs = _layer_inputs(model, x)
    ranks = set()
    for name, layer in nenni_layers(model).items():
        xin = inputs[name].contiguous().to(DEVICE)
        with torch.no_grad():
            pred = layer.predict(inputs[name])
            expected_mask = select(pred, layer.spec)
            expected = torch.where(expected_mask, layer.exact(inputs[name]), pred)
        tensors = [
            layer.exact.folded_weight(), layer.exact.bias, layer.proj, layer.quantized_approx_weight(),
            layer.approx_bias,
        ]  # fmt: skip
        tensors = [t.detach().contiguous().to(DEVICE) for t in tensors]
        y = torch.empty(expected.shape, device=DEVICE)
        # int32 0/1 as inside TensorRT; bool (stored as bytes) for one granularity
        dtype = torch.bool if granularity == "threshold" else torch.int32
        mask = torch.zeros(expected.shape, dtype=dtype, device=DEVICE)
        plan = kernels.nenni_layer(xin, *tensors, y, mask, _attrs(layer))
        assert plan.n == expected.shape[1]
        assert set(mask.int().unique().tolist()) <= {0, 1}
        torch.testing.assert_close(mask.cpu().bool(), expected_mask, msg=f"{name}: mask")
        torch.testing.assert_close(y.cpu(), expected, atol=1e-4, rtol=1e-4, msg=f"{name}: output")
        ranks.add(layer.spec.rank)
        if granularity == "channel":  # filters no sample selected are never read: NaN there changes nothing
            unused = ~expected_mask.flatten(2).any(2).any(0) if expected_mask.dim() > 2 else ~expected_mask.any(0)
            assert unused.any()
            poisoned = tensors[0].clone()
            poisoned[unused.to(DEVICE)] = float("nan")
            y2 = torch.empty_like(y)
            kernels.nenni_layer(xin, poisoned, *tensors[1:], y2, mask, _attrs(layer))
            torch.testing.assert_close(y2, y, msg=f"{name}: a non-essential filter was read")
            poisoned[~unused.to(DEVICE)] = float("nan")  # and the test can tell: selected filters are read
            kernels.nenni_layer(xin, poisoned, *tensors[1:], y2, mask, _attrs(layer))
            assert y2.isnan().any()
    assert ranks == {"signed", "magnitude"}


def test_channel_selection_is_rank_order_with_ties_to_the_lower_index():
    scores = torch.tensor([[0.5, 2.0, 2.0, -1.0, 2.0, 0.1]])
    selected = torch.empty(1, 6, dtype=torch.int32)
    indices = torch.empty(1, 3, dtype=torch.int32)
    kernels._rank_select[(1, 1)](scores, selected, 6, 3, BLOCK_C=64, BLOCK_J=64)
    kernels._compact[(1, 1)](selected, indices, 6, 3, BLOCK_C=64, BLOCK_J=64)
    assert selected.tolist() == [[0, 1, 1, 0, 1, 0]] and indices.tolist() == [[1, 2, 4]]
    scores = torch.tensor([[3.0, 3.0, 3.0, 3.0]])  # all tied: the lowest indices win
    selected = torch.empty(1, 4, dtype=torch.int32)
    kernels._rank_select[(1, 1)](scores, selected, 4, 2, BLOCK_C=64, BLOCK_J=64)
    assert selected.tolist() == [[1, 1, 0, 0]]
    assert ranking_score(torch.tensor([-3.0]), "magnitude").item() == 3.0


def test_noise_counter_lives_on_the_device_and_advances_per_launch():
    state = kernels.NoiseState()
    y = torch.zeros(4, 8, 6, 6, device=DEVICE)
    mask = torch.zeros(y.shape, dtype=torch.int32, device=DEVICE)
    mask[:, :3] = 1
    z1, z2 = torch.empty_like(y), torch.empty_like(y)
    kernels.nenni_noise(y, mask, z1, seed=11, std=0.5, state=state)
    assert state.counter(y.device).item() == y.numel()  # advanced on the device, by the kernel
    kernels.nenni_noise(y, mask, z2, seed=11, std=0.5, state=state)  # same seed by value: fresh noise anyway
    assert (z1[:, :3] == 0).all() and (z2[:, :3] == 0).all()  # no noise on essential neurons
    assert not torch.equal(z1, z2)
    drawn = z1[:, 3:].flatten()
    assert abs(drawn.mean().item()) < 0.1 and abs(drawn.std().item() - 0.5) < 0.05
    state.reset()
    z3 = torch.empty_like(y)
    kernels.nenni_noise(y, mask, z3, seed=11, std=0.5, state=state)
    torch.testing.assert_close(z3, z1)  # a reset counter replays the stream: reproducible per seed


def test_plugin_implementations_run_the_kernels(monkeypatch):
    """The `@trtp.impl` functions as TensorRT would call them (attributes as plugin fields, outputs preallocated),
    with CPU tensors standing in for TensorRT's buffers."""
    import numpy as np
    from _fake_tensorrt import install

    from nenni_deploy.runtime.tensorrt import plugins

    if DEVICE == "cpu":
        monkeypatch.setattr(plugins, "DEVICE", "cpu")
    registry = install(monkeypatch)
    model, _ = tiny_nenni("channel", "gaussian", noise_scale=0.5)
    x = torch.rand(2, *TINY_SHAPE, generator=torch.Generator().manual_seed(5))
    inputs = _layer_inputs(model, x)
    name, layer = next((n, m) for n, m in nenni_layers(model).items() if m.is_conv)
    a = _attrs(layer)
    tensors = [
        inputs[name], layer.exact.folded_weight(), layer.exact.bias, layer.proj, layer.quantized_approx_weight(),
        layer.approx_bias,
    ]  # fmt: skip
    tensors = [t.detach().contiguous().to(DEVICE) for t in tensors]
    with torch.no_grad():
        pred = layer.predict(inputs[name])
        expected_mask = select(pred, layer.spec)
        expected = torch.where(expected_mask, layer.exact(inputs[name]), pred)
    y = torch.empty(expected.shape, device=DEVICE)
    m = torch.empty(expected.shape, dtype=torch.int32, device=DEVICE)
    registry["nenni::NenniConv"]["impl"](
        *tensors, granularity=b"channel", rank=layer.spec.rank, k=np.int32(a.k), nm=np.array(a.nm, np.int32),
        threshold=np.float32(a.threshold), strides=np.array(a.strides, np.int32), pads=np.array(a.pads, np.int32),
        dilations=np.array(a.dilations, np.int32), outputs=(y, m), stream=0,
    )  # fmt: skip
    torch.testing.assert_close(y.cpu(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.cpu().bool(), expected_mask)
    z1, z2 = torch.empty_like(y), torch.empty_like(y)
    noise = registry["nenni::NenniNoise"]["impl"]
    for z in (z1, z2):  # unseeded (-1): the process seed, and a counter that moves on
        noise(y, m, scale=np.float32(0.5), residual_rms=np.float32(2.0), seed=np.float32(-1.0), outputs=(z,), stream=0)
    assert torch.equal(z1[m.bool()], y[m.bool()]) and not torch.equal(z1, z2)
    assert abs((z1 - y)[~m.bool()].std().item() - 1.0) < 0.15  # std = scale * residual_rms

"""The NENNI layer (PyTorch reference semantics) and the batch-norm-folded exact layers it wraps.

z' = m * z + (1 - m) * (z~ + noise), with z = W x + b the exact output, z~ = W~ (P x) + b~ the prediction and
m the essential mask chosen from z~ (constant in backward). This module is the one definition of the op's
semantics; the ONNX function bodies and any fused kernel are tested against it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerSpec
from .projection import ternary_projection
from .quant import fake_quantize
from .selection import channel_indices, ranking_score, select


def _scale_parameter(n: int) -> nn.Parameter:
    """The folded batch-norm factor as a parameter that does not train unless asked (training/params.py).

    A parameter, not a buffer, so that fine-tuning can train it in its own unfolded scale; its state-dict key
    is `scale` either way, so model directories written when it was a buffer load unchanged.
    """
    return nn.Parameter(torch.ones(n), requires_grad=False)


class ScaledConv2d(nn.Conv2d):
    """A convolution with batch norm folded in as a per-channel `scale`: W_folded = scale * weight.

    Training `weight` in its original (unfolded) scale keeps one learning rate sensible for every channel;
    training the folded weight directly acts like a step scale^-2 larger and diverges (method.md 1.4).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = _scale_parameter(self.out_channels)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ScaledConv2d:
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        return _with_tensors(_same_geometry(cls, conv), conv.weight, bias)

    def folded_weight(self) -> torch.Tensor:
        return self.weight * self.scale.view(-1, 1, 1, 1)

    def to_plain(self) -> nn.Conv2d:
        """A plain Conv2d holding the folded weight: one constant in an exported graph, not weight * scale."""
        return _with_tensors(_same_geometry(nn.Conv2d, self), self.folded_weight(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.folded_weight(), self.bias)


class ScaledLinear(nn.Linear):
    """A linear layer with a per-output `scale` (batch norm folded in, or ones)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = _scale_parameter(self.out_features)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> ScaledLinear:
        bias = lin.bias if lin.bias is not None else torch.zeros(lin.out_features)
        return _with_tensors(cls(lin.in_features, lin.out_features, bias=True), lin.weight, bias)

    def folded_weight(self) -> torch.Tensor:
        return self.weight * self.scale.view(-1, 1)

    def to_plain(self) -> nn.Linear:
        """A plain Linear holding the folded weight."""
        return _with_tensors(nn.Linear(self.in_features, self.out_features), self.folded_weight(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.folded_weight(), self.bias)


def _same_geometry(cls: type[nn.Conv2d], conv: nn.Conv2d) -> nn.Conv2d:
    return cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    )


def _with_tensors(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    return module.to(weight.device)


MODES = ("nenni", "exact")  # the method, or the wrapped exact layer alone
EXECUTIONS = ("masked", "skip")
GRADIENTS = ("true", "exact", "approx")


class _Choice:
    """A string attribute that only takes one of its choices: a typo fails where it is set, not silently later."""

    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def __set_name__(self, owner, name: str) -> None:
        self.public, self.private = name, f"_{name}"

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__[self.private]

    def __set__(self, obj, value: str) -> None:
        if value not in self.choices:
            raise ValueError(f"NenniLayer.{self.public} must be one of {', '.join(self.choices)}, got {value!r}")
        obj.__dict__[self.private] = value


class NenniLayer(nn.Module):
    """A frozen exact layer, a seeded ternary projection and a fitted approximator W~, b~.

    `mode` is "nenni" (the method) or "exact" (the wrapped layer alone: before fitting, and for baselines).
    `execution` is "masked" (computes everything, any granularity) or "skip" (channel granularity only: computes
    just the essential channels per sample). Both give the same result.
    """

    mode = _Choice(MODES)
    execution = _Choice(EXECUTIONS)
    gradient = _Choice(GRADIENTS)

    def __init__(self, exact: ScaledConv2d | ScaledLinear, spec: LayerSpec) -> None:
        super().__init__()
        self.exact = exact
        self.spec = spec
        self.is_conv = isinstance(exact, nn.Conv2d)
        n, k = spec.out_dim, spec.proj_dim
        geometry = tuple(exact.weight.shape[1:])  # (C_in, kh, kw) or (d,)
        self.register_buffer("proj", ternary_projection((k, *geometry), spec.seed).to(exact.weight.device))
        self.approx_weight = nn.Parameter(torch.zeros(n, k, device=exact.weight.device))
        self.approx_bias = nn.Parameter(torch.zeros(n, device=exact.weight.device))
        self.register_buffer("residual_rms", torch.tensor(float(spec.residual_rms or 0.0)))
        self.mode = "nenni"
        self.execution = "masked"
        # A run-time essential ratio (annealing during fine-tuning); None runs the spec's. Never saved: the
        # spec keeps the target.
        self.run_ratio: float | None = None
        self.generator: torch.Generator | None = None  # set for reproducible noise; None draws from torch's RNG
        # Backward pass: "true" differentiates what runs; "exact" and "approx" are BPDA straight-through
        # estimators (forward through NENNI, backward through the exact layer or the approximator), used by
        # adaptive attacks to see past the non-differentiable top-k selection.
        self.gradient = "true"

    # -- the pieces -----------------------------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """P x at every position: additions and subtractions only on hardware that exploits it."""
        if self.is_conv:
            c = self.exact
            return F.conv2d(x, self.proj, None, c.stride, c.padding, c.dilation)
        return F.linear(x, self.proj)

    def quantized_approx_weight(self) -> torch.Tensor:
        return fake_quantize(self.approx_weight, self.spec.approx_bits)

    def approximate(self, u: torch.Tensor) -> torch.Tensor:
        """z~ = W~ u + b~ (a 1x1 convolution for conv layers)."""
        w = self.quantized_approx_weight()
        if self.is_conv:
            return F.conv2d(u, w[:, :, None, None], self.approx_bias)
        return F.linear(u, w, self.approx_bias)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.approximate(self.project(x))

    def fill(self, pred: torch.Tensor) -> torch.Tensor:
        """What non-essential neurons output: the prediction, plus explicit noise in `gaussian` mode."""
        if self.spec.noise != "gaussian":
            return pred
        std = self.spec.noise_scale * self.residual_rms
        noise = torch.randn(pred.shape, generator=self.generator, device=pred.device, dtype=pred.dtype)
        return pred + std * noise

    def active_spec(self) -> LayerSpec:
        """The spec the forward pass runs: the saved one, or a copy at the run-time ratio."""
        r = self.run_ratio
        s = self.spec
        if r is None or s.granularity == "threshold":
            return s
        if s.granularity == "nm":
            n, m = s.nm
            return dataclasses.replace(s, nm=(min(m, max(n, round(r * m))), m))
        return dataclasses.replace(s, ratio=max(s.ratio, min(1.0, r)))

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "exact":
            return self.exact(x)
        pred = self.predict(x)
        if self.execution == "skip":
            out = self.forward_skip(x, pred)
        else:
            mask = select(pred, self.active_spec())
            out = torch.where(mask, self.exact(x), self.fill(pred))
        if self.gradient == "true":
            return out
        surrogate = self.exact(x) if self.gradient == "exact" else pred
        return surrogate + (out - surrogate).detach()

    def forward_skip(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Channel granularity computing only the K essential channels of each sample."""
        spec = self.active_spec()
        if spec.granularity != "channel":
            raise RuntimeError("skip execution exists only for the channel granularity")
        with torch.no_grad():
            idx = channel_indices(ranking_score(pred, spec.rank), spec.essential)  # (B, K)
        weight, bias = self.exact.folded_weight(), self.exact.bias
        b, k = idx.shape
        if self.is_conv:
            # One group per sample: sample i's input meets only its own K selected filters.
            c = self.exact
            w_sel = weight[idx].reshape(b * k, *weight.shape[1:])
            out = F.conv2d(
                x.reshape(1, -1, *x.shape[2:]),
                w_sel,
                bias[idx].reshape(-1),
                c.stride,
                c.padding,
                c.dilation,
                groups=b,
            )
            out = out.view(b, k, *out.shape[2:])
            index = idx[:, :, None, None].expand(-1, -1, *out.shape[2:])
        else:
            out = torch.bmm(weight[idx], x.unsqueeze(2)).squeeze(2) + bias[idx]
            index = idx
        return self.fill(pred).scatter(1, index, out)

    def extra_repr(self) -> str:
        s = self.spec
        pattern = f"{s.nm[0]}:{s.nm[1]}" if s.granularity == "nm" else f"ratio={s.ratio:g}"
        return f"{s.granularity}, {pattern}, k={s.proj_dim}, rank={s.rank}, noise={s.noise}, bits={s.approx_bits}"


def nenni_layers(model: nn.Module) -> dict[str, NenniLayer]:
    """The model's NENNI layers by qualified name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NenniLayer)}


def set_mode(model: nn.Module, mode: str) -> None:
    for layer in nenni_layers(model).values():
        layer.mode = mode


def set_execution(model: nn.Module, execution: str) -> None:
    for layer in nenni_layers(model).values():
        if execution == "skip" and layer.spec.granularity != "channel":
            continue
        layer.execution = execution


def anneal_ratio(model: nn.Module, progress: float | None) -> None:
    """Essential ratio of every layer at `progress` in [0, 1] of its anneal: 1.0 (all exact) at 0, the spec's
    target at 1, linear between; None (or >= 1) runs the targets."""
    for layer in nenni_layers(model).values():
        if progress is None or progress >= 1:
            layer.run_ratio = None
        else:
            t = max(0.0, float(progress))
            layer.run_ratio = 1.0 - t * (1.0 - layer.spec.ratio)


def seed_noise(model: nn.Module, seed: int | None) -> None:
    """Make explicit noise reproducible (one generator per layer), or None to draw from torch's global RNG."""
    for i, layer in enumerate(nenni_layers(model).values()):
        if seed is None:
            layer.generator = None
        else:
            layer.generator = torch.Generator(device=layer.proj.device).manual_seed(int(seed) * 1000003 + i)

"""The NENNI plugins' shape and type rules and their kernels' launch parameters, as pure functions.

Nothing here imports TensorRT, Triton or a GPU library, so all of it is unit-tested on any machine; the plugin
definitions (`plugins`) and the kernel driver (`kernels`) call these and nothing else decides a shape or a grid.
The shape functions are written over `+ - * //` only, so the same code runs on ints here and on TensorRT's
symbolic shape expressions (`tensorrt.plugin.ShapeExpr`) when the engine is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import NenniError
from ...exporters import ops

# Block sizes: tl.dot needs every matrix dimension >= 16; 32 x 64 output tiles keep registers moderate.
BLOCK_SLOTS = 32  # output channels (or selected channels) per program
BLOCK_POSITIONS = 64  # output positions per program
BLOCK_POSITIONS_SMALL = 16  # linear layers (one position) and small maps
BLOCK_REDUCTION = 32  # input channels x kernel taps per step
BLOCK_CHANNELS = 64  # channels per program in the score / rank / compaction kernels
BLOCK_ELEMENTS = 1024  # elementwise kernels (combine, noise)
NUM_WARPS = 4


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- shapes and types -------------------------------------------------------------------------------------------
def conv_output_extent(size: Any, kernel: Any, stride: int, pad_total: int, dilation: int) -> Any:
    """ONNX Conv's output extent; `size` and `kernel` may be ints or TensorRT shape expressions."""
    return (size + pad_total - (kernel - 1) * dilation - 1) // stride + 1


def layer_output_shape(
    x_shape: Sequence[Any], w_shape: Sequence[Any], attrs: LayerAttrs | None = None
) -> tuple[Any, ...]:
    """Y's shape (and the mask's): (B, n, H_out, W_out) for NenniConv, (B, n) for NenniLinear."""
    if len(x_shape) == 2:
        return (x_shape[0], w_shape[0])
    if attrs is None or len(x_shape) != 4 or len(w_shape) != 4:
        raise NenniError(f"NenniConv needs 4-D input and weight, got {len(x_shape)}-D and {len(w_shape)}-D")
    spatial = tuple(
        conv_output_extent(
            x_shape[2 + i], w_shape[2 + i], attrs.strides[i], attrs.pads[i] + attrs.pads[i + 2], attrs.dilations[i]
        )
        for i in range(2)
    )
    return (x_shape[0], w_shape[0], *spatial)


# The plugins run in float32 (weights and activations). The mask crosses from a layer plugin to its noise
# plugin as INT32 0/1: TensorRT plugins cannot take or produce BOOL tensors (PluginTensorDesc: "kBOOL and kUINT8
# are not supported"), and INT8 would be read as quantized. The ONNX graph still declares the mask bool; the
# static checker makes sure only NenniNoise nodes read it.
LAYER_TYPES = ("FP32",) * 6 + ("FP32", "INT32")
NOISE_TYPES = ("FP32", "INT32", "FP32")


def type_combination(op_type: str) -> str:
    """The `tensorrt.plugin.AutoTuneCombination` type string: inputs then outputs, one position each."""
    types = NOISE_TYPES if op_type == ops.NOISE else LAYER_TYPES
    spec = ops.PLUGIN_SPECS[op_type]
    assert len(types) == spec.inputs + spec.outputs
    return ", ".join(types)


# -- attributes -------------------------------------------------------------------------------------------------
def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _ints(value: Any, n: int, name: str) -> tuple[int, ...]:
    out = tuple(int(v) for v in (value if value is not None else ()))
    if len(out) != n:
        raise NenniError(f"plugin attribute {name!r} needs {n} integers, got {list(out)}")
    return out


@dataclass(frozen=True)
class LayerAttrs:
    """A NenniConv / NenniLinear node's attributes as the plugin receives them, checked."""

    granularity: str
    rank: str
    k: int
    nm: tuple[int, int]
    threshold: float
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)

    @classmethod
    def parse(cls, *, granularity, rank, k, nm, threshold, strides=None, pads=None, dilations=None) -> LayerAttrs:
        granularity, rank = _text(granularity), _text(rank)
        if granularity not in ops.GRANULARITIES:
            raise NenniError(f"plugin attribute granularity must be one of {ops.GRANULARITIES}, got {granularity!r}")
        if rank not in ops.RANKS:
            raise NenniError(f"plugin attribute rank must be one of {ops.RANKS}, got {rank!r}")
        n, m = _ints(nm, 2, "nm")
        if int(k) < 1 or not 0 < n < m:
            raise NenniError(f"plugin attributes need k >= 1 and 0 < N < M, got k={k}, nm={[n, m]}")
        geometry = {}
        if strides is not None:
            geometry = dict(
                strides=_ints(strides, 2, "strides"),
                pads=_ints(pads, 4, "pads"),
                dilations=_ints(dilations, 2, "dilations"),
            )
            if min(geometry["strides"] + geometry["dilations"]) < 1 or min(geometry["pads"]) < 0:
                raise NenniError(f"plugin geometry must be positive: {geometry}")
        return cls(granularity, rank, int(k), (n, m), float(threshold), **geometry)

    @property
    def magnitude(self) -> bool:
        return self.rank == "magnitude"

    def check_channels(self, n: int) -> None:
        """What TopK-free selection needs of the layer's width n (the ONNX bodies fail the same way)."""
        if self.granularity in ("element", "channel") and self.k > n:
            raise NenniError(f"k = {self.k} essential channels of a layer with {n}")
        if self.granularity == "nm" and n % self.nm[1]:
            raise NenniError(f"N:M with M = {self.nm[1]} needs the channel count ({n}) to be a multiple of M")


def noise_seed(seed_attr: float, fallback: int) -> int:
    """The Philox key of a noise node: its `seed` attribute, or `fallback` (drawn per process) when unseeded."""
    if seed_attr is None or seed_attr < 0:
        return int(fallback)
    if seed_attr != int(seed_attr) or seed_attr > ops.MAX_SEED:
        raise NenniError(f"noise seed must be an integer in [0, {ops.MAX_SEED}], got {seed_attr}")
    return int(seed_attr)


# -- launch parameters ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """One kernel launch: grid (x, y), block sizes (constexprs) and warps."""

    grid: tuple[int, int]
    blocks: dict[str, int]
    num_warps: int = NUM_WARPS

    @property
    def threads(self) -> int:
        return self.num_warps * 32


def positions_block(positions: int) -> int:
    return BLOCK_POSITIONS_SMALL if positions <= BLOCK_POSITIONS_SMALL else BLOCK_POSITIONS


def conv_rows_launch(batch: int, slots: int, positions: int) -> Launch:
    """The implicit-GEMM convolution over `slots` output rows (all n, the k projection rows, or the K selected
    channels of each sample): one program per (sample, block of rows) x block of positions."""
    bp = positions_block(positions)
    return Launch(
        (batch * cdiv(slots, BLOCK_SLOTS), cdiv(positions, bp)),
        {"BLOCK_S": BLOCK_SLOTS, "BLOCK_P": bp, "BLOCK_R": BLOCK_REDUCTION},
    )


def channel_launch(batch: int, channels: int) -> Launch:
    """Scores, ranks and compaction: one program per (sample, block of channels)."""
    return Launch((batch, cdiv(channels, BLOCK_CHANNELS)), {"BLOCK_C": BLOCK_CHANNELS, "BLOCK_J": BLOCK_CHANNELS})


def group_mask_launch(batch: int, channels: int, positions: int) -> Launch:
    """Per-position top-K within groups (element: one group of n; nm: groups of M)."""
    bp = positions_block(positions)
    return Launch(
        (batch * cdiv(channels, BLOCK_CHANNELS), cdiv(positions, bp)), {"BLOCK_C": BLOCK_CHANNELS, "BLOCK_P": bp}
    )


def elementwise_launch(total: int) -> Launch:
    return Launch((max(1, cdiv(total, BLOCK_ELEMENTS)), 1), {"BLOCK": BLOCK_ELEMENTS})


@dataclass(frozen=True)
class LayerPlan:
    """Everything one NENNI layer launch needs, from the shapes alone: sizes, scratch and the launches in order."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_height: int
    out_width: int
    n: int  # output channels
    k_proj: int  # projection rows
    kernel: tuple[int, int]
    essential: int  # K (channel / element) or N (nm)
    granularity: str

    @property
    def positions(self) -> int:
        return self.out_height * self.out_width

    @property
    def reduction(self) -> int:
        return self.in_channels * self.kernel[0] * self.kernel[1]

    def scratch_elements(self) -> dict[str, int]:
        """Scratch buffers (elements) besides the plugin's outputs: the projection u, and per granularity the
        dense exact output (element, nm, threshold) or the channel scores, selection flags and indices."""
        sizes = {"u": self.batch * self.k_proj * self.positions}
        if self.granularity == "channel":
            sizes.update(scores=self.batch * self.n, selected=self.batch * self.n, indices=self.batch * self.essential)
        else:
            sizes["exact"] = self.batch * self.n * self.positions
        return sizes

    def launches(self) -> list[tuple[str, Launch]]:
        b, n, L = self.batch, self.n, self.positions
        steps = [
            ("projection", conv_rows_launch(b, self.k_proj, L)),  # u = conv(x, P)
            ("approximator", conv_rows_launch(b, n, L)),  # z~ = Wa u + Ba, written into Y
        ]
        if self.granularity == "channel":
            steps += [
                ("scores", channel_launch(b, n)),
                ("rank", channel_launch(b, n)),
                ("compact", channel_launch(b, n)),
                ("exact_selected", conv_rows_launch(b, self.essential, L)),  # only the K essential filters
                ("mask", elementwise_launch(b * n * L)),
            ]
        else:
            steps.append(("exact_dense", conv_rows_launch(b, n, L)))
            if self.granularity in ("element", "nm"):
                steps.append(("group_mask", group_mask_launch(b, n, L)))
            steps.append(("combine", elementwise_launch(b * n * L)))
        return steps


def layer_plan(x_shape: Sequence[int], w_shape: Sequence[int], p_shape: Sequence[int], attrs: LayerAttrs) -> LayerPlan:
    """The plan for concrete shapes (run time): conv inputs (B, C, H, W), linear inputs (B, d) as 1x1 maps."""
    out = layer_output_shape(x_shape, w_shape, attrs)
    n = int(w_shape[0])
    attrs.check_channels(n)
    if len(x_shape) == 2:
        b, c, h, w, oh, ow, kernel = x_shape[0], x_shape[1], 1, 1, 1, 1, (1, 1)
    else:
        b, c, h, w = x_shape
        oh, ow = out[2], out[3]
        kernel = (int(w_shape[2]), int(w_shape[3]))
    essential = attrs.nm[0] if attrs.granularity == "nm" else attrs.k
    return LayerPlan(
        int(b), int(c), int(h), int(w), int(oh), int(ow), n, int(p_shape[0]), kernel, essential, attrs.granularity
    )


def noise_launches(total: int) -> list[tuple[str, Launch]]:
    """Draw (Philox at the device-side counter) then advance the counter by `total`: two launches on one stream,
    so a replayed CUDA graph reads a counter the previous replay advanced, and draws fresh noise."""
    return [("draw", elementwise_launch(total)), ("advance", Launch((1, 1), {}, num_warps=1))]

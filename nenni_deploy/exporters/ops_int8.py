"""The int8 form of the NENNI layer ops: function bodies on uint8 activations and 8-bit integer weights.

A NenniConv / NenniLinear node that carries the int8 attributes (`x_scale`, `x_zero_point`, `u_scale`,
`u_zero_point`, `y_scale`, `y_zero_point`, `w_bits`, `approx_bits`; set by exporters/int8.py from calibration)
calls an overload ending in `_int8`. Its inputs and outputs are those of the float op (float X in, float Y and
M out), so it sits in a float or QDQ graph alike, and the float weights stay in the node: the body quantizes
them with standard ops on constants only, which ONNX Runtime folds into integer initializers when it loads
the model.

Every product of the layer runs on integers:
- X is quantized once to uint8 (`x_scale`, `x_zero_point`): patches are cut from uint8 data, a quarter of the
  bytes the float body moves.
- The ternary projection P = sqrt(3/k) {-1, 0, 1} is exact in 8 bits: its levels times one scale. u = levels
  (x_q - x_zp) in int32 (MatMulInteger, levels + 1 as uint8 with zero point 1), then requantized to uint8
  (`u_scale`, `u_zero_point`).
- The approximator Wa is already on a symmetric `approx_bits` grid (nenni.quant.fake_quantize), so its
  integer levels are exact: pred = s_wa * s_u * (Wa_q (u_q - u_zp)) + Ba, in int32 by MatMulInteger.
- The exact path uses symmetric per-filter weights at `w_bits` (levels +-(2^(w_bits-1) - 1)). The skipping
  channel body gathers the selected filters' uint8 rows (level + 128, zero point 128) and multiplies them
  with the shared uint8 patches in one batched MatMulInteger, then rescales each row by s_x * s_w[filter].
  uint8 x uint8 because ONNX Runtime's int8 x int8 MatMulInteger is several times slower on AVX2 CPUs, and
  QLinearMatMul takes one scale for the whole left operand, which per-filter weights gathered per sample do
  not have. Bodies that compute the exact layer densely (element, threshold, nm, channel `masked`) write it
  as QuantizeLinear / DequantizeLinear around a Conv or Gemm (int32 bias, output requantized at `y_scale`),
  which ONNX Runtime fuses into QLinearConv / QGemm: its fastest integer convolution.

Only MatMulInteger u8 x u8 and the QDQ groups are used: both are standard ONNX and run on every ORT CPU build.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnx import FunctionProto, TensorProto, helper

from .ops import (
    _GEOMETRY_REFS,
    _GROUPED_REFS,
    CONV,
    DOMAIN,
    _as_groups,
    _Body,
    _channel_conv_fill,
    _channel_indices,
    _layer_attribute_names,
    _mask,
    _scatter_mask,
    _tail,
    _tap_columns,
    _tap_rows,
    kernel_of_overload,
    lowering_of_overload,
    overload_form,
    overload_name,
)

_U8 = TensorProto.UINT8


def _float(b: _Body, value: float) -> str:
    return b("Constant", value_float=float(value))


def _zero_point(b: _Body, attr: str) -> str:
    """A uint8 scalar from an integer attribute."""
    return b("Cast", b.ref(attr, "int"), to=_U8)


def _u8(b: _Body, value: int) -> str:
    return b("Cast", b.int_(value), to=_U8)


def _levels_max(b: _Body, bits_attr: str) -> str:
    """2^(bits - 1) - 1 as a float scalar, from an integer attribute."""
    bits = b("Cast", b.ref(bits_attr, "int"), to=TensorProto.FLOAT)
    return b("Sub", b("Pow", _float(b, 2.0), b("Sub", bits, _float(b, 1.0))), _float(b, 1.0))


def _symmetric(b: _Body, weight: str, axes: Sequence[int], qmax: str) -> tuple[str, str]:
    """(integer levels as float, per-row scale (rows,)) of a symmetric per-row grid with levels +-qmax: the
    rule of nenni.quant.fake_quantize, so an approximator already on that grid is reproduced exactly."""
    amax = b("ReduceMax", b("Abs", weight), b.ints(list(axes)), keepdims=1)
    scale = b("Div", b("Max", amax, _float(b, 1e-12)), qmax)
    levels = b("Clip", b("Round", b("Div", weight, scale)), b("Neg", qmax), qmax)
    return levels, b("Reshape", scale, b.ints([-1]))


def _offset_u8(b: _Body, levels: str, offset: int) -> str:
    """Integer levels (float) shifted into uint8 (zero point `offset`)."""
    return b("Cast", b("Add", levels, _float(b, offset)), to=_U8)


def _quantize_input(b: _Body) -> tuple[str, str, str]:
    """(X as uint8, its scale, its uint8 zero point)."""
    xs, xz = b.ref("x_scale", "float"), _zero_point(b, "x_zero_point")
    return b("QuantizeLinear", "X", xs, xz), xs, xz


def _rescale(b: _Body, acc: str, scale: str, bias: str) -> str:
    """int32 accumulators to float: acc * scale + bias (both broadcast)."""
    return b("Add", b("Mul", b("Cast", acc, to=TensorProto.FLOAT), scale), bias)


def _ternary(b: _Body, proj: str) -> tuple[str, str]:
    """(levels + 1 as uint8, the scale): the projection's {-1, 0, 1} levels and its one magnitude."""
    scale = b("Max", b("ReduceMax", b("Abs", proj), keepdims=0), _float(b, 1e-12))
    return b("Cast", b("Add", b("Round", b("Div", proj, scale)), _float(b, 1.0)), to=_U8), scale


def _approximate(b: _Body, u32: str, unit: str, rows_first: bool) -> str:
    """The prediction from the int32 projection u32 (in units of `unit` = x_scale * the projection's scale):
    requantize u to uint8, multiply by the approximator's integer levels. rows_first: u32 is (B, k, L) and
    the result (B, n, L); else (B, k) -> (B, n)."""
    b.stage = "approximate"
    us, uz = b.ref("u_scale", "float"), _zero_point(b, "u_zero_point")
    uq = b("QuantizeLinear", b("Cast", u32, to=TensorProto.FLOAT), b("Div", us, unit), uz)
    return _approximate_q(b, uq, us, uz, rows_first)


def _approximate_q(b: _Body, uq: str, us: str, uz: str, rows_first: bool) -> str:
    b.stage = "approximate"
    levels, wa_scale = _symmetric(b, "Wa", [1], _levels_max(b, "approx_bits"))  # (n, k), (n,)
    scale = b("Mul", wa_scale, us)
    if rows_first:
        acc = b("MatMulInteger", _offset_u8(b, levels, 128), uq, _u8(b, 128), uz)  # (B, n, L)
        return _rescale(b, acc, b("Unsqueeze", scale, b.ints([1])), b("Unsqueeze", "Ba", b.ints([1])))
    acc = b("MatMulInteger", uq, _offset_u8(b, b("Transpose", levels), 128), uz, _u8(b, 128))  # (B, n)
    return _rescale(b, acc, scale, "Ba")


def _score(b: _Body, pred: str, rank: str) -> str:
    b.stage = "select"
    return b("Abs", pred) if rank == "magnitude" else pred


def _exact_rows(b: _Body, weight: str) -> tuple[str, str]:
    """Per-filter symmetric weights of a (n, d) bank as uint8 rows (level + 128) and their scales (n,)."""
    levels, scale = _symmetric(b, weight, [1], _levels_max(b, "w_bits"))
    return _offset_u8(b, levels, 128), scale


# -- bodies -----------------------------------------------------------------------------------------------------
def _channel_conv_skip(b: _Body, rank: str, kernel: tuple[int, int]) -> None:
    """Channel convolution: uint8 patches cut once, shared by the projection and the gathered exact filters."""
    b.stage = "project"
    xq, xs, xz = _quantize_input(b)
    patches = _tap_columns(b, kernel, xq, xz)  # (B, d, H_out, W_out) uint8, padded with the zero point
    out_shape = b("Shape", patches)
    cols = b("Reshape", patches, b.ints([0, 0, -1]))  # (B, d, L)
    # The projection on the same patches (a QLinearConv of its own measured no faster: the patches are cut anyway)
    ternary, p_scale = _ternary(b, _tap_rows(b, "P"))
    u32 = b("MatMulInteger", ternary, cols, _u8(b, 1), xz)  # (B, k, L)
    pred = _approximate(b, u32, b("Mul", xs, p_scale), rows_first=True)  # (B, n, L)
    idx, channel_score = _channel_indices(b, _score(b, pred, rank), [2], ascending=False)
    b.stage = "exact"
    rows_u8, w_scale = _exact_rows(b, _tap_rows(b, "W"))
    acc = b("MatMulInteger", b("Gather", rows_u8, idx, axis=0), cols, _u8(b, 128), xz)  # (B, K, L)
    scale = b("Unsqueeze", b("Gather", b("Mul", w_scale, xs), idx, axis=0), b.ints([2]))
    bias = b("Unsqueeze", b("Gather", "B", idx, axis=0), b.ints([2]))
    _channel_conv_fill(b, pred, idx, _rescale(b, acc, scale, bias), out_shape, channel_score)


def _channel_conv_grouped(b: _Body, rank: str) -> None:
    """Static batch: the projection as a QDQ group, the K selected filters of every sample as one ConvInteger
    whose groups are the samples (uint8 x uint8, the filters' levels + 128)."""
    b.stage = "project"
    xq, xs, xz = _quantize_input(b)
    uq, us, uz = _projection_qdq(b, b("DequantizeLinear", xq, xs, xz), conv=True)
    out_shape = b("Shape", uq)  # (B, k, H_out, W_out): Y keeps its batch and spatial dims
    pred = _approximate_q(b, b("Reshape", uq, b.ints([0, 0, -1])), us, uz, rows_first=True)  # (B, n, L)
    idx, channel_score = _channel_indices(b, _score(b, pred, rank), [2], ascending=False)
    b.stage = "exact"
    levels, w_scale = _symmetric(b, "W", [1, 2, 3], _levels_max(b, "w_bits"))
    w_shape = b("Shape", "W")
    rows = b("Gather", _offset_u8(b, levels, 128), idx, axis=0)  # (B, K, C_in, kh, kw)
    rows = b("Reshape", rows, b("Concat", b.ints([-1]), _tail(b, w_shape, 1), axis=0))
    acc = b("ConvInteger", _as_groups(b, xq), rows, xz, _u8(b, 128), refs=_GROUPED_REFS)  # (1, B * K, H, W)
    acc = b("Reshape", acc, b("Concat", b("Shape", idx), b.ints([-1]), axis=0))  # (B, K, L)
    scale = b("Unsqueeze", b("Gather", b("Mul", w_scale, xs), idx, axis=0), b.ints([2]))
    bias = b("Unsqueeze", b("Gather", "B", idx, axis=0), b.ints([2]))
    _channel_conv_fill(b, pred, idx, _rescale(b, acc, scale, bias), out_shape, channel_score)


def _channel_linear_skip(b: _Body, rank: str) -> None:
    b.stage = "project"
    xq, xs, xz = _quantize_input(b)
    ternary, p_scale = _ternary(b, b("Transpose", "P"))  # (d, k)
    u32 = b("MatMulInteger", xq, ternary, xz, _u8(b, 1))  # (B, k)
    pred = _approximate(b, u32, b("Mul", xs, p_scale), rows_first=False)  # (B, n)
    idx, channel_score = _channel_indices(b, _score(b, pred, rank), None)
    b.stage = "exact"
    rows_u8, w_scale = _exact_rows(b, "W")
    column = b("Unsqueeze", xq, b.ints([2]))  # (B, d, 1)
    acc = b("Squeeze", b("MatMulInteger", b("Gather", rows_u8, idx, axis=0), column, _u8(b, 128), xz), b.ints([2]))
    exact = _rescale(b, acc, b("Gather", b("Mul", w_scale, xs), idx, axis=0), b("Gather", "B", idx, axis=0))
    b.stage = "fill"
    b("ScatterElements", pred, idx, exact, axis=1, outputs=["Y"])
    b("Identity", _scatter_mask(b, channel_score, idx, axis=1), outputs=["M"])


def _qdq_weight(b: _Body, weight: str, conv: bool) -> tuple[str, str]:
    """(DequantizeLinear of the per-filter int8 weight, its scale (n,)): the weight half of a QDQ group."""
    rank_axes = [1, 2, 3] if conv else [1]
    levels, scale = _symmetric(b, weight, rank_axes, _levels_max(b, "w_bits"))
    w8 = b("Cast", levels, to=TensorProto.INT8)
    zero = b("Cast", b("Mul", scale, _float(b, 0.0)), to=TensorProto.INT8)
    return b("DequantizeLinear", w8, scale, zero, axis=0), scale


def _projection_qdq(b: _Body, xd: str, conv: bool) -> tuple[str, str, str]:
    """(P x as uint8, its scale, its zero point): the projection as a QDQ group (DequantizeLinear of the input
    and of the ternary levels, Conv or Gemm, QuantizeLinear) that ORT fuses into QLinearConv / QGemm, whose
    weights it prepacks."""
    p_scale = b("Max", b("ReduceMax", b("Abs", "P"), keepdims=0), _float(b, 1e-12))
    levels = b("Cast", b("Round", b("Div", "P", p_scale)), to=TensorProto.INT8)
    # An explicit zero point: ORT fuses a QDQ group into an integer kernel only when the weight's DQ has one.
    ternary = b("DequantizeLinear", levels, p_scale, b("Cast", b.int_(0), to=TensorProto.INT8))
    us, uz = b.ref("u_scale", "float"), _zero_point(b, "u_zero_point")
    u = b("Conv", xd, ternary, refs=_GEOMETRY_REFS) if conv else b("Gemm", xd, ternary, transB=1)
    return b("QuantizeLinear", u, us, uz), us, uz


def _masked_int8(b: _Body, conv: bool, granularity: str, rank: str) -> None:
    """Dense integer layer, then select: every product in a QDQ group ORT fuses into an integer kernel."""
    geometry = _GEOMETRY_REFS if conv else None
    b.stage = "project"
    xq, xs, xz = _quantize_input(b)
    xd = b("DequantizeLinear", xq, xs, xz)
    uq, us, uz = _projection_qdq(b, xd, conv)
    if conv:  # the 1x1 approximator as (n, k) x (B, k, L)
        pred = _approximate_q(b, b("Reshape", uq, b.ints([0, 0, -1])), us, uz, rows_first=True)
        u_shape = b("Shape", uq)  # not of u: a QDQ group fuses only when Q is the Conv's one consumer
        shape = b(
            "Concat",
            b("Slice", u_shape, b.ints([0]), b.ints([1])),
            b("Shape", "Wa", start=0, end=1),
            b("Slice", u_shape, b.ints([2]), b.ints([4])),
            axis=0,
        )
        pred = b("Reshape", pred, shape)
    else:
        pred = _approximate_q(b, uq, us, uz, rows_first=False)
    score = _score(b, pred, rank)
    mask = _mask(b, score, granularity, conv)
    b.stage = "exact"
    wd, w_scale = _qdq_weight(b, "W", conv)
    bias_scale = b("Mul", w_scale, xs)
    bias_levels = b("Cast", b("Round", b("Div", "B", bias_scale)), to=TensorProto.INT32)
    bias = b("DequantizeLinear", bias_levels, bias_scale, axis=0)
    y = b("Conv", xd, wd, bias, refs=geometry) if conv else b("Gemm", xd, wd, bias, transB=1)
    ys, yz = b.ref("y_scale", "float"), _zero_point(b, "y_zero_point")
    exact = b("DequantizeLinear", b("QuantizeLinear", y, ys, yz), ys, yz)
    b.stage = "fill"
    b("Where", mask, exact, pred, outputs=["Y"])
    b("Identity", mask, outputs=["M"])


def computes_densely(op_type: str, overload: str) -> bool:
    """Whether the int8 body of a node with this (float or int8) overload computes the exact layer densely, as a
    QDQ group fused into ORT's u8 x s8 kernels (whose AVX2 form can saturate 8-bit weights: `w_bits` 7 there),
    rather than by gathered u8 x u8 MatMulInteger."""
    granularity = overload.split("_", 1)[0]
    lowering = lowering_of_overload(overload)
    if granularity == "channel" and lowering == "grouped":
        return False  # ConvInteger u8 x u8
    skip = granularity == "channel" and lowering == "skip"
    return not (skip and (op_type != CONV or kernel_of_overload(overload) is not None))


def layer_function_int8(
    op_type: str,
    granularity: str,
    rank: str,
    opset: int,
    kernel: Sequence[int] | None = None,
    lowering: str = "skip",
) -> FunctionProto:
    """The int8 body of one overload (`ops.overload_name(..., int8=True)`)."""
    conv, kernel, lowering = overload_form(op_type, granularity, kernel, lowering)
    if lowering in ("masked", "grouped"):
        kernel = None
    b = _Body()
    if granularity == "channel" and lowering == "grouped":
        _channel_conv_grouped(b, rank)
    elif granularity == "channel" and lowering == "skip" and kernel is not None:
        _channel_conv_skip(b, rank, kernel)
    elif granularity == "channel" and lowering == "skip" and not conv:
        _channel_linear_skip(b, rank)
    else:  # a channel convolution of unknown kernel size computes densely too
        _masked_int8(b, conv, granularity, rank)
    return helper.make_function(
        DOMAIN,
        op_type,
        ["X", "W", "B", "P", "Wa", "Ba"],
        ["Y", "M"],
        b.nodes,
        [helper.make_opsetid("", opset)],
        attributes=_layer_attribute_names(conv, granularity, int8=True, lowering=lowering),
        doc_string=f"{op_type} ({granularity}, {rank} ranking), int8 form, in standard ONNX ops",
        overload=overload_name(granularity, rank, kernel, lowering, int8=True),
    )

"""Triton kernels for the NENNI plugins and the driver that launches them in order on one stream.

The same code runs on a GPU (inside the TensorRT plugins) and, with `TRITON_INTERPRET=1`, on the CPU, which is
how the tests hold it to the PyTorch reference (`nenni.layers`) on machines without a GPU.

Layer (NenniConv / NenniLinear; a linear layer is a convolution of a 1x1 map with a 1x1 kernel):
1. u = conv(x, P) and z~ = Wa u + Ba with one implicit-GEMM kernel (`_conv_rows`), z~ written straight into Y;
2. `channel`: per-sample channel scores (spatial mean), the rank of each channel (ties to the lower index, as
   a stable top-K), the K selected channels compacted in ascending order, then `_conv_rows` again over only
   those K filters per sample, overwriting their channels of Y: the non-essential filters are never read;
3. `element`, `nm`, `threshold`: the exact output densely, the mask (per-position rank within a group of all n
   channels or of M, or the threshold), and Y = where(mask, exact, z~): these patterns do not skip on dense
   hardware, like the ONNX bodies.
Noise: Philox-4x32 keyed by the node's seed at counter offsets read from device memory, then a one-thread
kernel advances that counter: the seed is passed by value, but the offset is not, so CUDA graph replay draws
fresh noise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launch, LayerAttrs, LayerPlan, elementwise_launch, layer_plan, noise_launches


@triton.jit
def _conv_rows(
    x_ptr,
    w_ptr,
    bias_ptr,
    idx_ptr,
    out_ptr,
    C,
    H,
    W,
    OW,
    L,
    S,
    R,
    OUT_C,
    KHW,
    KW,
    SH,
    SW,
    PT,
    PL,
    DH,
    DW,
    HAS_BIAS: tl.constexpr,
    INDIRECT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[b, row, p] = bias[row] + sum_r w[row, r] * patch(x)[b, r, p] for S rows per sample: rows 0..S-1, or
    (INDIRECT) the rows idx[b, 0..S-1]; each written to its own channel `row` of out (OUT_C channels)."""
    pid_bs = tl.program_id(0)
    pid_p = tl.program_id(1)
    n_sb = tl.cdiv(S, BLOCK_S)
    b = pid_bs // n_sb
    slots = (pid_bs % n_sb) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = slots < S
    if INDIRECT:
        rows = tl.load(idx_ptr + b * S + slots, mask=s_ok, other=0)
    else:
        rows = slots
    pos = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = pos < L
    oh = pos // OW
    ow = pos % OW
    acc = tl.zeros((BLOCK_S, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < R
        ci = r // KHW
        kh = (r % KHW) // KW
        kw = r % KW
        w = tl.load(w_ptr + rows[:, None] * R + r[None, :], mask=s_ok[:, None] & r_ok[None, :], other=0.0)
        ih = oh[None, :] * SH - PT + kh[:, None] * DH
        iw = ow[None, :] * SW - PL + kw[:, None] * DW
        inside = r_ok[:, None] & p_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x = tl.load(x_ptr + ((b * C + ci[:, None]) * H + ih) * W + iw, mask=inside, other=0.0)
        acc += tl.dot(w, x, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=s_ok, other=0.0)[:, None]
    out = out_ptr + (b * OUT_C + rows[:, None]) * L + pos[None, :]
    tl.store(out, acc, mask=s_ok[:, None] & p_ok[None, :])


@triton.jit
def _channel_scores(pred_ptr, score_ptr, N, L, ABS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    """score[b, c] = mean over positions of z~ (or |z~|)."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < N
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, L, BLOCK_J):
        p = p0 + tl.arange(0, BLOCK_J)
        ok = c_ok[:, None] & (p < L)[None, :]
        v = tl.load(pred_ptr + (b * N + c[:, None]) * L + p[None, :], mask=ok, other=0.0)
        if ABS:
            v = tl.abs(v)
        acc += tl.sum(v, axis=1)
    tl.store(score_ptr + b * N + c, acc / L, mask=c_ok)


@triton.jit
def _rank_select(score_ptr, sel_ptr, N, K, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    """sel[b, c] = 1 when fewer than K channels rank above c (higher score, or equal score and lower index)."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < N
    s = tl.load(score_ptr + b * N + c, mask=c_ok, other=0.0)
    rank = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        j_ok = j < N
        sj = tl.load(score_ptr + b * N + j, mask=j_ok, other=0.0)
        above = (sj[None, :] > s[:, None]) | ((sj[None, :] == s[:, None]) & (j[None, :] < c[:, None]))
        rank += tl.sum((above & j_ok[None, :]).to(tl.int32), axis=1)
    tl.store(sel_ptr + b * N + c, (rank < K).to(tl.int32), mask=c_ok)


@triton.jit
def _compact(sel_ptr, idx_ptr, N, K, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    """idx[b, i] = the i-th selected channel in ascending order (its position: selected channels below it)."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < N
    sel = tl.load(sel_ptr + b * N + c, mask=c_ok, other=0)
    pos = tl.zeros((BLOCK_C,), dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        sj = tl.load(sel_ptr + b * N + j, mask=j < N, other=0)
        pos += tl.sum(((j[None, :] < c[:, None]) & (sj[None, :] != 0)).to(tl.int32), axis=1)
    tl.store(idx_ptr + b * K + pos, c, mask=c_ok & (sel != 0))


@triton.jit
def _group_mask(pred_ptr, mask_ptr, N, L, GROUP, KEEP, ABS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """mask[b, c, p] = c is among the KEEP highest scores of its group of GROUP consecutive channels at p."""
    n_cb = tl.cdiv(N, BLOCK_C)
    b = tl.program_id(0) // n_cb
    c = (tl.program_id(0) % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = (c < N)[:, None] & (p < L)[None, :]
    s = tl.load(pred_ptr + (b * N + c[:, None]) * L + p[None, :], mask=ok, other=0.0)
    if ABS:
        s = tl.abs(s)
    first = (c // GROUP) * GROUP
    rank = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.int32)
    for jj in range(0, GROUP):
        j = first + jj
        sj = tl.load(pred_ptr + (b * N + j[:, None]) * L + p[None, :], mask=ok, other=0.0)
        if ABS:
            sj = tl.abs(sj)
        rank += ((sj > s) | ((sj == s) & (j < c)[:, None])).to(tl.int32)
    tl.store(mask_ptr + (b * N + c[:, None]) * L + p[None, :], (rank < KEEP).to(mask_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _combine(
    y_ptr, exact_ptr, mask_ptr, sel_ptr, total, L, threshold, MODE: tl.constexpr, ABS: tl.constexpr, BLOCK: tl.constexpr
):
    """MODE 0: y = where(mask, exact, y); MODE 1: the mask is score > threshold, then as 0; MODE 2 (channel):
    only the mask, broadcast from the per-channel selection (y already holds the exact channels)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    if MODE == 2:
        m = tl.load(sel_ptr + i // L, mask=ok, other=0) != 0
        tl.store(mask_ptr + i, m.to(mask_ptr.dtype.element_ty), mask=ok)
    else:
        pred = tl.load(y_ptr + i, mask=ok, other=0.0)
        if MODE == 1:
            s = pred
            if ABS:
                s = tl.abs(pred)
            m = s > threshold
            tl.store(mask_ptr + i, m.to(mask_ptr.dtype.element_ty), mask=ok)
        else:
            m = tl.load(mask_ptr + i, mask=ok, other=0) != 0
        exact = tl.load(exact_ptr + i, mask=ok, other=0.0)
        tl.store(y_ptr + i, tl.where(m, exact, pred), mask=ok)


@triton.jit
def _noise_draw(y_ptr, mask_ptr, z_ptr, state_ptr, total, seed, std, BLOCK: tl.constexpr):
    """z = y where the mask is set, else y + std * e, e ~ N(0, 1) from Philox(seed, counter + i)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < total
    counter = tl.load(state_ptr) + i.to(tl.int64)
    lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    hi = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = tl.zeros_like(lo)
    r0, r1, _, _ = tl.random.philox(seed, lo, hi, zero, zero)
    e, _ = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(r0), tl.random.uint_to_uniform_float(r1))
    y = tl.load(y_ptr + i, mask=ok, other=0.0)
    keep = tl.load(mask_ptr + i, mask=ok, other=0) != 0
    tl.store(z_ptr + i, tl.where(keep, y, y + std * e), mask=ok)


@triton.jit
def _noise_advance(state_ptr, total):
    tl.store(state_ptr, tl.load(state_ptr) + total)


# -- driver -----------------------------------------------------------------------------------------------------
class Scratch:
    """Scratch buffers per (device, name), grown on demand and then reused. The first enqueue (engine build or
    warm-up) allocates them; later enqueues, including CUDA graph capture, only reuse them. Layers share them,
    which is safe because their launches are ordered on one stream (`build` turns off auxiliary streams)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (str(device), name)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel]


SCRATCH = Scratch()


def _grid(launch: Launch) -> tuple[int, int]:
    return launch.grid


def _conv(x, w, bias, idx, out, plan: LayerPlan, rows: int, out_channels: int, geometry, launch: Launch) -> None:
    (sh, sw), (pt, pl), (dh, dw), (c, h, wd, kh, kw) = geometry
    _conv_rows[_grid(launch)](
        x,
        w,
        bias if bias is not None else w,
        idx if idx is not None else w,
        out,
        c,
        h,
        wd,
        plan.out_width,
        plan.positions,
        rows,
        c * kh * kw,
        out_channels,
        kh * kw,
        kw,
        sh,
        sw,
        pt,
        pl,
        dh,
        dw,
        HAS_BIAS=bias is not None,
        INDIRECT=idx is not None,
        num_warps=launch.num_warps,
        **launch.blocks,
    )


def nenni_layer(x, w, b, p, wa, ba, y, mask, attrs: LayerAttrs, scratch: Scratch = SCRATCH) -> LayerPlan:
    """Run one NENNI layer into the given outputs: y (float32, Y's shape) and mask (Y's shape; int32 0/1 inside
    TensorRT, which has no bool plugin tensors; bool or uint8 also work). Every tensor is contiguous and on one
    device; kernels go to the current stream."""
    plan = layer_plan(tuple(x.shape), tuple(w.shape), tuple(p.shape), attrs)
    steps = dict(plan.launches())
    dev, L, n = x.device, plan.positions, plan.n
    mask8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    spatial = (plan.in_channels, plan.height, plan.width, *plan.kernel)
    geometry = (attrs.strides, attrs.pads[:2], attrs.dilations, spatial)
    one_by_one = ((1, 1), (0, 0), (1, 1), (plan.k_proj, plan.out_height, plan.out_width, 1, 1))
    u = scratch.get("u", plan.batch * plan.k_proj * L, torch.float32, dev)
    _conv(x, p, None, None, u, plan, plan.k_proj, plan.k_proj, geometry, steps["projection"])
    _conv(u, wa, ba, None, y, plan, n, n, one_by_one, steps["approximator"])
    abs_ = attrs.magnitude
    if attrs.granularity == "channel":
        scores = scratch.get("scores", plan.batch * n, torch.float32, dev)
        selected = scratch.get("selected", plan.batch * n, torch.int32, dev)
        indices = scratch.get("indices", plan.batch * plan.essential, torch.int32, dev)
        launch = steps["scores"]
        _channel_scores[_grid(launch)](y, scores, n, L, ABS=abs_, num_warps=launch.num_warps, **launch.blocks)
        launch = steps["rank"]
        _rank_select[_grid(launch)](scores, selected, n, plan.essential, num_warps=launch.num_warps, **launch.blocks)
        launch = steps["compact"]
        _compact[_grid(launch)](selected, indices, n, plan.essential, num_warps=launch.num_warps, **launch.blocks)
        _conv(x, w, b, indices, y, plan, plan.essential, n, geometry, steps["exact_selected"])
        launch = steps["mask"]
        _combine[_grid(launch)](
            y, y, mask8, selected, plan.batch * n * L, L, 0.0, MODE=2, ABS=False, num_warps=launch.num_warps,
            **launch.blocks,
        )  # fmt: skip
        return plan
    exact = scratch.get("exact", plan.batch * n * L, torch.float32, dev)
    _conv(x, w, b, None, exact, plan, n, n, geometry, steps["exact_dense"])
    mode = 1 if attrs.granularity == "threshold" else 0
    if mode == 0:
        group, keep = (n, attrs.k) if attrs.granularity == "element" else (attrs.nm[1], attrs.nm[0])
        launch = steps["group_mask"]
        _group_mask[_grid(launch)](y, mask8, n, L, group, keep, ABS=abs_, num_warps=launch.num_warps, **launch.blocks)
    launch = steps["combine"]
    _combine[_grid(launch)](
        y, exact, mask8, mask8, plan.batch * n * L, L, attrs.threshold, MODE=mode, ABS=abs_,
        num_warps=launch.num_warps, **launch.blocks,
    )  # fmt: skip
    return plan


class NoiseState:
    """The Philox counter, one int64 per device, in device memory: every noise launch reads it and advances it."""

    def __init__(self) -> None:
        self._counters: dict[str, torch.Tensor] = {}

    def counter(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._counters:
            self._counters[key] = torch.zeros(1, dtype=torch.int64, device=device)
        return self._counters[key]

    def reset(self) -> None:
        for counter in self._counters.values():
            counter.zero_()


NOISE_STATE = NoiseState()


def nenni_noise(y, mask, z, seed: int, std: float, state: NoiseState = NOISE_STATE) -> None:
    total = y.numel()
    counter = state.counter(y.device)
    mask8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    steps = dict(noise_launches(total))
    draw = steps["draw"]
    _noise_draw[_grid(draw)](y, mask8, z, counter, total, seed, float(std), num_warps=draw.num_warps, **draw.blocks)
    _noise_advance[_grid(steps["advance"])](counter, total, num_warps=1)


__all__ = ["NOISE_STATE", "SCRATCH", "NoiseState", "Scratch", "elementwise_launch", "nenni_layer", "nenni_noise"]

"""Square attack (Andriushchenko, Croce, Flammarion, Hein 2020): score-based random search, Linf and L2.

It needs nothing but a function from images to scores, so it runs on a deployed model (an ONNX Runtime session)
with no gradient and no PyTorch source. The schedule of the square size, the initialisation and the margin loss
follow AutoAttack's `square.py` (its `standard` settings: p_init 0.8, the schedule keyed to the query index, not
rescaled to the budget); the code is written here from that definition.

One deliberate difference: AutoAttack draws one square position and one colour per round for the whole batch;
here every image draws its own (as the paper's algorithm does per image), with the same distribution. Each round
queries all still-unbroken images in one call; an image stops as soon as it is misclassified.

Queries are counted per image as the paper and AutoAttack count them: the query on the initial point is the
first, each round adds one; the check of the clean image is not counted. `queries` bounds that total.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import NenniError

# images (B, C, H, W) in [0, 1] -> scores (B, K): logits or log-probabilities
Scores = Callable[[torch.Tensor], torch.Tensor]
# (round, images still attacked, queries spent so far by all images)
Progress = Callable[[int, int, int], None]

NORMS = ("linf", "l2")
LOSSES = ("margin", "ce")
# AutoAttack's piecewise-constant schedule: after `bound` rounds (of 10,000), p is p_init / divisor.
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


def p_selection(p_init: float, it: int, queries: int, rescale: bool = False) -> float:
    """The fraction of the image a square covers at round `it` (0-based)."""
    if rescale:
        it = int(it / queries * 10000)
    for bound, divisor in _SCHEDULE:
        if it <= bound:
            return p_init / divisor
    return p_init / 512


def margin_and_loss(scores: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Margin (true score minus the best other one: > 0 while correct) and the loss the search lowers."""
    true = scores.gather(1, y[:, None]).squeeze(1)
    others = scores.masked_fill(F.one_hot(y, scores.shape[1]).bool(), float("-inf")).amax(1)
    margin = true - others
    if loss == "margin":
        return margin, margin
    return margin, -F.cross_entropy(scores, y, reduction="none")


def _stripe_pattern(rows: int, cols: int) -> torch.Tensor:
    """AutoAttack's nested rectangles around the centre (rows // 2, cols // 2): ring k (Chebyshev distance
    from the centre) gets the sum of 1 / (j + 1)^2 over j = k .. K - 1, then the block is L2-normalised."""
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols)
    rings = max(rows // 2 + 1, cols // 2 + 1)
    tail = torch.flip(torch.cumsum(torch.flip(1.0 / torch.arange(1, rings + 1, dtype=torch.float32) ** 2, [0]), 0), [0])
    i = (torch.arange(rows) - rows // 2).abs()
    j = (torch.arange(cols) - cols // 2).abs()
    block = tail[torch.maximum(i[:, None], j[None, :])]
    return block / block.norm()


def eta(s: int) -> torch.Tensor:
    """The s x s L2 square: a positive pattern on the top half, a negative one on the bottom, unit norm."""
    top = _stripe_pattern(s // 2, s)
    bottom = -_stripe_pattern(s - s // 2, s)
    block = torch.cat([top, bottom], 0)
    return block / block.norm().clamp_min(1e-12)


@contextmanager
def _one_thread() -> Iterator[None]:
    """The search's own tensor ops are small; run them on one thread. Several torch threads spinning between
    rounds, next to ONNX Runtime's threads doing the queries, made each op 50-100x slower (measured)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _between_rounds(scores: Scores) -> Scores:
    """`scores` runs with the caller's thread count (a PyTorch model would be slow on one)."""
    saved = torch.get_num_threads()

    def run(x: torch.Tensor) -> torch.Tensor:
        inner = torch.get_num_threads()
        torch.set_num_threads(saved)
        try:
            return scores(x)
        finally:
            torch.set_num_threads(inner)

    return run


@dataclass
class SquareResult:
    x_adv: torch.Tensor  # (N, C, H, W), in budget and in [0, 1]
    queries: torch.Tensor  # (N,) int64: queries spent per image (0 where the clean image was already wrong)
    fooled: torch.Tensor  # (N,) bool: misclassified at the end (clean mistakes included)
    clean_correct: torch.Tensor  # (N,) bool


@dataclass
class Square:
    """Square attack under an Linf or L2 budget in [0, 1] pixel units, with at most `queries` per image."""

    eps: float
    norm: str = "linf"
    queries: int = 5000
    p_init: float = 0.8
    loss: str = "margin"
    seed: int = 0
    rescale_schedule: bool = False

    def __post_init__(self) -> None:
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise NenniError(f"Square: eps must be > 0, got {self.eps}")
        if self.norm not in NORMS:
            raise NenniError(f"Square: norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.loss not in LOSSES:
            raise NenniError(f"Square: loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.queries < 1:
            raise NenniError(f"Square: the query budget must be >= 1, got {self.queries}")
        if not 0 < self.p_init <= 1:
            raise NenniError(f"Square: p_init must be in (0, 1], got {self.p_init}")

    def to_dict(self) -> dict:
        return asdict(self)

    # -- random draws ---------------------------------------------------------------------------------------
    def _signs(self, shape, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=gen).float().mul_(2).sub_(1)

    def _corners(self, n: int, span: int, gen: torch.Generator) -> torch.Tensor:
        """Top-left offsets in [0, span) as AutoAttack draws them (floor of a uniform; 0 when span is 0)."""
        return (torch.rand(n, generator=gen) * span).long()

    def _patterns(self, n: int, s: int, gen: torch.Generator) -> torch.Tensor:
        """(N, 1, s, s): eta(s), transposed for a random half of the images (AutoAttack flips it half the time)."""
        pattern = eta(s)
        flip = torch.rand(n, generator=gen) > 0.5
        return torch.where(flip[:, None, None, None], pattern.t(), pattern)

    @staticmethod
    def _window(corner_h: torch.Tensor, corner_w: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
        """(B, 1, H, W) boolean mask of each image's s x s square."""
        rows = torch.arange(h)
        cols = torch.arange(w)
        in_rows = (rows[None, :] >= corner_h[:, None]) & (rows[None, :] < corner_h[:, None] + s)
        in_cols = (cols[None, :] >= corner_w[:, None]) & (cols[None, :] < corner_w[:, None] + s)
        return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]

    # -- the attack -------------------------------------------------------------------------------------------
    def perturb(
        self, scores: Scores, x: torch.Tensor, y: torch.Tensor, *, progress: Progress | None = None
    ) -> SquareResult:
        x = x.detach().float().contiguous()
        y = y.detach().long()
        n, c, h, w = x.shape
        if self.norm == "l2" and min(h, w) < 5:
            raise NenniError(f"Square L2 needs images of at least 5x5 pixels, got {h}x{w}")
        gen = torch.Generator().manual_seed(int(self.seed))
        scores = _between_rounds(scores)
        with torch.no_grad(), _one_thread():
            clean_margin, _ = margin_and_loss(scores(x), y, self.loss)
            clean_correct = clean_margin > 0
            queries = torch.zeros(n, dtype=torch.long)
            fooled = ~clean_correct
            x_best = x.clone()
            idx = clean_correct.nonzero().squeeze(1)
            if len(idx):
                x0, y0 = x[idx], y[idx]
                start = self._init_linf(x0, gen) if self.norm == "linf" else self._init_l2(x0, gen)
                margin, loss = margin_and_loss(scores(start), y0, self.loss)
                x_best[idx] = start
                queries[idx] = 1
                self._search(scores, x, y, idx, x_best, margin, loss, queries, gen, progress)
                fooled[idx] = margin <= 0
        return SquareResult(x_best, queries, fooled, clean_correct)

    def _init_linf(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Vertical stripes: +-eps per (image, channel, column)."""
        n, c, _, w = x.shape
        return (x + self.eps * self._signs((n, c, 1, w), gen)).clamp(0, 1)

    def _init_l2(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A grid of s x s L2 squares (s = H // 5), each with a random sign per (image, channel), scaled to eps."""
        n, c, h, w = x.shape
        s = h // 5
        start = (h - s * 5) // 2
        delta = torch.zeros_like(x)
        for i in range(h // s):
            for j in range(w // s):
                top, left = start + i * s, start + j * s
                block = delta[:, :, top : top + s, left : left + s]
                pattern = self._patterns(n, s, gen)[:, :, : block.shape[2], : block.shape[3]]
                block += pattern * self._signs((n, c, 1, 1), gen)
        return (x + self._to_eps(delta)).clamp(0, 1)

    def _to_eps(self, delta: torch.Tensor) -> torch.Tensor:
        norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return delta / (norm + 1e-12) * self.eps

    def _search(self, scores, x, y, idx, x_best, margin, loss, queries, gen, progress) -> None:
        """Rounds of random search on the images in `idx`; x_best and queries are updated in place."""
        n_features = x[0].numel()
        c, h, w = x.shape[1:]
        active = margin > 0  # over idx
        spent = int(queries.sum())
        for it in range(self.queries - 1):
            live = active.nonzero().squeeze(1)
            if len(live) == 0:
                break
            rows = idx[live]
            xc, xb = x[rows], x_best[rows]
            p = p_selection(self.p_init, it, self.queries, self.rescale_schedule)
            if self.norm == "linf":
                s = min(max(int(round(math.sqrt(p * n_features / c))), 1), h, w)
                x_new = self._linf_candidate(xc, xb, s, gen)
            else:
                s = max(int(round(math.sqrt(p * n_features / c))), 3)
                s = min(s + 1 if s % 2 == 0 else s, h, w)
                x_new = self._l2_candidate(xc, xb, s, gen)
            new_margin, new_loss = margin_and_loss(scores(x_new), y[rows], self.loss)
            better = (new_loss < loss[live]) | (new_margin <= 0)
            loss[live] = torch.where(new_loss < loss[live], new_loss, loss[live])
            margin[live] = torch.where(better, new_margin, margin[live])
            took = rows[better]
            x_best[took] = x_new[better]
            queries[rows] += 1
            spent += len(rows)
            active[live] = margin[live] > 0
            if progress is not None:
                progress(it + 1, int(active.sum()), spent)

    def _linf_candidate(self, xc: torch.Tensor, xb: torch.Tensor, s: int, gen: torch.Generator) -> torch.Tensor:
        b, c, h, w = xc.shape
        window = self._window(self._corners(b, h - s, gen), self._corners(b, w - s, gen), s, h, w)
        step = 2 * self.eps * self._signs((b, c, 1, 1), gen)
        x_new = xb + window * step
        return torch.minimum(torch.maximum(x_new, xc - self.eps), xc + self.eps).clamp(0, 1)

    def _l2_candidate(self, xc: torch.Tensor, xb: torch.Tensor, s: int, gen: torch.Generator) -> torch.Tensor:
        """Move mass into one square (a fresh eta pattern plus what was there) from another, keep the norm eps."""
        b, c, h, w = xc.shape
        delta = xb - xc
        h1, w1 = self._corners(b, h - s, gen), self._corners(b, w - s, gen)
        h2, w2 = self._corners(b, h - s, gen), self._corners(b, w - s, gen)
        first = self._window(h1, w1, s, h, w)
        second = self._window(h2, w2, s, h, w)
        rows = h1[:, None] + torch.arange(s)  # (B, s)
        cols = w1[:, None] + torch.arange(s)
        bi = torch.arange(b)[:, None, None, None]
        ci = torch.arange(c)[None, :, None, None]
        ri, cj = rows[:, None, :, None], cols[:, None, None, :]
        old = delta[bi, ci, ri, cj]  # (B, C, s, s): the first square's content
        old_norm = old.pow(2).sum((2, 3), keepdim=True).sqrt()
        image_norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        window_norm = (delta * (first | second)).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        new = self._patterns(b, s, gen) * self._signs((b, c, 1, 1), gen) + old / (1e-12 + old_norm)
        budget = ((self.eps**2 - image_norm**2).clamp_min(0) / c + window_norm**2).sqrt()
        new = new / (1e-12 + new.pow(2).sum((2, 3), keepdim=True).sqrt()) * budget
        delta = delta.masked_fill(second, 0.0)
        delta[bi, ci, ri, cj] = new
        return (xc + self._to_eps(delta)).clamp(0, 1)

"""HopSkipJump (Chen, Jordan, Wainwright 2020): a decision-based attack that needs only the predicted label.

For graphs that expose a label and no scores. From a misclassified starting point it walks along the decision
boundary towards the clean image: a binary search onto the boundary, a Monte-Carlo estimate of the boundary's
normal from labels of random perturbations, a geometric step search, and again. The constants (the binary
search threshold gamma / d^2 for Linf and gamma / d^1.5 for L2, 100 * sqrt(t) estimates per step, the first
probe radius 0.1) are the authors' defaults; the code is written here from the paper's algorithm, batched over
images, with a per-image query budget and a per-image stop once the boundary point is within eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..errors import NenniError
from .square import NORMS, Progress, SquareResult, _between_rounds, _one_thread

# images (B, C, H, W) in [0, 1] -> predicted labels (B,)
Labels = Callable[[torch.Tensor], torch.Tensor]
_INIT_TRIES = 100  # random starting points tried per image before it is given up on
_BATCH_ROWS = 4096  # images per call while estimating gradients (memory bound, not a semantic choice)


@dataclass
class HopSkipJump:
    eps: float
    norm: str = "linf"
    queries: int = 5000
    gamma: float = 1.0
    init_evals: int = 100
    max_evals: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise NenniError(f"HopSkipJump: eps must be > 0, got {self.eps}")
        if self.norm not in NORMS:
            raise NenniError(f"HopSkipJump: norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.queries < 1 or self.init_evals < 1 or self.max_evals < self.init_evals:
            raise NenniError("HopSkipJump: queries and evaluations must be >= 1 (max_evals >= init_evals)")

    def to_dict(self) -> dict:
        return asdict(self)

    # -- geometry ----------------------------------------------------------------------------------------------
    def _dist(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = (a - b).flatten(1)
        return d.abs().amax(1) if self.norm == "linf" else d.norm(dim=1)

    def _project(self, x: torch.Tensor, p: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The point at `alpha` between x (0) and p: a blend for L2, the Linf box of radius alpha for Linf."""
        a = alpha.view(-1, *([1] * (x.dim() - 1)))
        if self.norm == "l2":
            return (1 - a) * x + a * p
        return torch.minimum(torch.maximum(p, x - a), x + a)

    # -- the attack ---------------------------------------------------------------------------------------------
    def perturb(
        self, labels: Labels, x: torch.Tensor, y: torch.Tensor, *, progress: Progress | None = None
    ) -> SquareResult:
        x = x.detach().float().contiguous()
        y = y.detach().long()
        n = len(x)
        d = x[0].numel()
        self._theta = self.gamma / (d**2 if self.norm == "linf" else d**1.5)
        self._gen = torch.Generator().manual_seed(int(self.seed))
        self._labels = _between_rounds(labels)
        self._progress, self._round = progress, 0
        with torch.no_grad(), _one_thread():
            clean_correct = self._labels(x) == y
            self.spent = torch.zeros(n, dtype=torch.long)
            x_adv = x.clone()
            fooled = ~clean_correct
            idx = clean_correct.nonzero().squeeze(1)
            if len(idx):
                adv, ok = self._search(x[idx], y[idx], idx)
                x_adv[idx] = adv
                fooled[idx] = ok
        return SquareResult(x_adv, self.spent, fooled, clean_correct)

    def _ask(self, images: torch.Tensor, y: torch.Tensor, who: torch.Tensor) -> torch.Tensor:
        """Is each image adversarial? Charges one query to each image's owner (`who`: indices into the batch)."""
        out = []
        for start in range(0, len(images), _BATCH_ROWS):
            out.append(self._labels(images[start : start + _BATCH_ROWS].clamp(0, 1)) != y[start : start + _BATCH_ROWS])
        self.spent.index_add_(0, who, torch.ones_like(who))
        return torch.cat(out)

    def _left(self, who: torch.Tensor) -> torch.Tensor:
        return self.queries - self.spent[who]

    def _search(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, found = self._initialise(x, y, idx)
        point, dist_before = self._boundary(x, y, start, idx, found)
        dist = self._dist(point, x)
        live = found & (dist > self.eps)
        t = 0
        while live.any():
            t += 1
            evals = min(int(self.init_evals * math.sqrt(t)), self.max_evals)
            # Room for the estimate, a step search and a binary search; the rest of the budget is not enough.
            live &= self._left(idx) >= evals + 64
            rows = live.nonzero().squeeze(1)
            if len(rows) == 0:
                break
            xr, yr, pr = x[rows], y[rows], point[rows]
            if t == 1:
                delta = torch.full((len(rows),), 0.1)
            else:
                # The probe radius scales with the last distance: d * theta for Linf, sqrt(d) * theta for L2.
                d = x[0].numel()
                delta = (d if self.norm == "linf" else math.sqrt(d)) * self._theta * dist_before[rows]
            grad = self._gradient(pr, yr, idx[rows], evals, delta)
            update = grad.sign() if self.norm == "linf" else grad
            stepped = self._step(pr, yr, idx[rows], update, dist[rows] / math.sqrt(t))
            new_point, new_before = self._boundary(xr, yr, stepped, idx[rows], torch.ones(len(rows), dtype=torch.bool))
            point[rows], dist_before[rows] = new_point, new_before
            dist[rows] = self._dist(new_point, xr)
            live[rows] = dist[rows] > self.eps
            self._round += 1
            if self._progress is not None:
                self._progress(self._round, int(live.sum()), int(self.spent.sum()))
        ok = found & (dist <= self.eps * (1 + 1e-6))
        # An image not broken within eps still gets an image inside the budget (its projection onto the ball).
        if self.norm == "linf":
            inside = self._project(x, point, torch.full((len(x),), self.eps))
        else:
            inside = x + (point - x) * torch.clamp(self.eps / dist.clamp_min(1e-12), max=1.0).view(-1, 1, 1, 1)
        out = torch.where(ok.view(-1, 1, 1, 1), point, inside.clamp(0, 1))
        return out, ok

    def _initialise(self, x, y, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """A misclassified uniform-noise image per image, blended towards the clean one by binary search."""
        start = x.clone()
        found = torch.zeros(len(x), dtype=torch.bool)
        for _ in range(_INIT_TRIES):
            todo = (~found & (self._left(idx) > 0)).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            noise = torch.rand(x[todo].shape, generator=self._gen)
            hit = self._ask(noise, y[todo], idx[todo])
            start[todo[hit]] = noise[hit]
            found[todo[hit]] = True
        low = torch.zeros(len(x))
        high = torch.ones(len(x))
        while True:
            todo = (found & (high - low > 1e-3) & (self._left(idx) > 0)).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            mid = (high[todo] + low[todo]) / 2
            m = mid.view(-1, 1, 1, 1)
            blended = (1 - m) * x[todo] + m * start[todo]
            hit = self._ask(blended, y[todo], idx[todo])
            high[todo] = torch.where(hit, mid, high[todo])
            low[todo] = torch.where(hit, low[todo], mid)
        h = high.view(-1, 1, 1, 1)
        return torch.where(found.view(-1, 1, 1, 1), (1 - h) * x + h * start, x), found

    def _boundary(self, x, y, p, idx, live) -> tuple[torch.Tensor, torch.Tensor]:
        """Binary search between x and the adversarial p onto the boundary (the adversarial side is kept); also
        the distance of p before the search, which scales the next probe."""
        before = self._dist(p, x)
        if self.norm == "linf":
            high = before.clone()
            threshold = torch.clamp(before * self._theta, max=self._theta)
        else:
            high = torch.ones(len(x))
            threshold = torch.full((len(x),), self._theta)
        low = torch.zeros(len(x))
        while True:
            todo = (live & ((high - low) / threshold > 1) & (self._left(idx) > 0)).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            mid = (high[todo] + low[todo]) / 2
            hit = self._ask(self._project(x[todo], p[todo], mid), y[todo], idx[todo])
            high[todo] = torch.where(hit, mid, high[todo])
            low[todo] = torch.where(hit, low[todo], mid)
        return torch.where(live.view(-1, 1, 1, 1), self._project(x, p, high), p), before

    def _gradient(self, p, y, who, evals: int, delta: torch.Tensor) -> torch.Tensor:
        """The boundary's normal at p from the labels of `evals` random points at radius delta around it."""
        out = torch.empty_like(p)
        per_call = max(1, _BATCH_ROWS // evals)
        for s in range(0, len(p), per_call):
            pb, yb, wb, db = p[s : s + per_call], y[s : s + per_call], who[s : s + per_call], delta[s : s + per_call]
            shape = (len(pb), evals, *p.shape[1:])
            if self.norm == "l2":
                rv = torch.randn(shape, generator=self._gen)
            else:
                rv = torch.rand(shape, generator=self._gen) * 2 - 1
            rv = rv / rv.flatten(2).norm(dim=2).view(*shape[:2], 1, 1, 1)
            dd = db.view(-1, 1, 1, 1, 1)
            probes = (pb[:, None] + dd * rv).clamp(0, 1)
            rv = (probes - pb[:, None]) / dd
            hits = self._ask(probes.flatten(0, 1), yb.repeat_interleave(evals), wb.repeat_interleave(evals)).view(
                len(pb), evals
            )
            f = hits.float() * 2 - 1
            mean = f.mean(1, keepdim=True)
            # Baseline subtraction, except where every probe agrees (then the mean direction is the answer).
            agree = (mean.abs() == 1).view(-1)
            f = torch.where(agree[:, None], f, f - mean)
            g = (f.view(*f.shape, 1, 1, 1) * rv).mean(1)
            out[s : s + per_call] = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return out

    def _step(self, p, y, who, update, size: torch.Tensor) -> torch.Tensor:
        """Halve each image's step from dist / sqrt(t) until the stepped point is still adversarial."""
        size = size.clone()
        done = torch.zeros(len(p), dtype=torch.bool)
        for _ in range(40):
            todo = (~done & (self._left(who) > 0)).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            cand = (p[todo] + size[todo].view(-1, 1, 1, 1) * update[todo]).clamp(0, 1)
            hit = self._ask(cand, y[todo], who[todo])
            done[todo[hit]] = True
            size[todo[~hit]] /= 2
        size[~done] = 0  # the boundary point itself is adversarial: stay there
        return (p + size.view(-1, 1, 1, 1) * update).clamp(0, 1)

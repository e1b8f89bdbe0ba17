"""Running the suite: chunked, cached by a hash of (model, images, attack config, eps), reduced to a worst case,
and checked for the signs of an evaluation that cannot be trusted (method.md section 3)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import NenniError
from ..files import atomic_output
from ..nenni.layers import seed_noise
from .suite import GRADIENT_FAMILIES, PGD, Row, Settings
from .targets import Target, torch_logits

# Below this many points an accuracy difference is noise of the subset size, not a finding.
TOLERANCE = 0.5
SANITY_EPS = 64 / 255  # nothing real survives a budget this large: accuracy must fall to 0


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def images_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().numpy().astype(np.int64).tobytes())
    return h.hexdigest()


class Cache:
    """One small JSON per (key): survives interruption, so a rerun with the same arguments resumes."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise NenniError(f"cannot create cache folder {folder}: {exc.strerror or exc}") from None

    def get(self, key: str) -> dict | None:
        if self.folder is None:
            return None
        path = self.folder / f"{key}.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def put(self, key: str, value: dict) -> None:
        if self.folder is None:
            return
        with atomic_output(self.folder / f"{key}.json") as tmp:
            tmp.write_text(json.dumps(value))

    def get_array(self, key: str) -> np.ndarray | None:
        """The adversarial images of a chunk, kept only when a run saves them (--save-adv)."""
        if self.folder is None:
            return None
        try:
            return np.load(self.folder / f"{key}.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None

    def put_array(self, key: str, value: np.ndarray) -> None:
        if self.folder is None:
            return
        with atomic_output(self.folder / f"{key}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, value, allow_pickle=False)


@dataclass
class RowResult:
    name: str
    family: str
    config: dict[str, Any]
    accuracy: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)  # ONNX vs PyTorch top-1 on the adversarial images
    success: dict[str, float] = field(default_factory=dict)  # % of the clean-correct images the attack fools
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    correct: dict[str, list[bool]] = field(default_factory=dict)
    queries: dict[str, list[int]] = field(default_factory=dict)  # per image, for query-based attacks


def craft(row: Row, x: torch.Tensor, y: torch.Tensor, eps: float, start: int = 0, progress=None):
    """(adversarial x, warnings, per-image information) from any row."""
    out = row.craft(x, y, eps, start=start, progress=progress) if row.context else row.craft(x, y, eps)
    return (*out, {}) if len(out) == 2 else out


def applies(row: Row, eps: float) -> bool:
    return row.min_eps is None or row.min_eps <= eps * (1 + 1e-4) + 1e-9


def _chunk_seed(base: int, *parts: Any) -> int:
    return int(digest([base, *parts])[:8], 16)


def check_budget(name: str, x: torch.Tensor, adv: torch.Tensor, eps: float, norm: str) -> None:
    """Every attack, ours or the package's, must stay in budget: a violation is a bug, never a result."""
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    if bool((size > eps * (1 + 1e-4) + 1e-6).any()) or adv.min() < 0 or adv.max() > 1 or not torch.isfinite(adv).all():
        raise NenniError(f"attack {name} left its {norm} budget {eps:g} or the image range: refusing the result")


class Evaluation:
    def __init__(
        self,
        target: Target,
        x: torch.Tensor,
        y: torch.Tensor,
        settings: Settings,
        *,
        chunk: int = 100,
        cache: Cache | None = None,
        progress: bool = True,
        keep_adversarial: bool = False,
    ) -> None:
        self.target, self.x, self.y, self.settings = target, x, y, settings
        self.chunk = chunk
        self.cache = cache or Cache(None)
        self.progress = progress
        # Per eps label: one adversarial image per image (the first attack that fooled it, else the first
        # attack's), and which attack that was ("" where none did); kept only when asked (--save-adv).
        self.keep_adversarial = keep_adversarial
        self.adversarial: dict[str, np.ndarray] = {}
        self.fooled_by: dict[str, list[str]] = {}
        self.chunks = [(s, min(s + chunk, len(x))) for s in range(0, len(x), chunk)]
        self.chunk_digests = [images_digest(x[a:b], y[a:b]) for a, b in self.chunks]

    # -- one forward of the deployed model ----------------------------------------------------------------------
    def _seed(self, *parts: Any) -> None:
        """Noise streams that depend only on the chunk and the attack, so a resumed run repeats a fresh one."""
        seed = _chunk_seed(self.settings.seed, *parts)
        if self.target.source is not None:
            seed_noise(self.target.source.module, seed % (2**31))
        if self.target.kind == "onnx" and self.target.randomised:
            import onnxruntime

            onnxruntime.set_seed(seed % (2**31))

    def predict(self, x: torch.Tensor) -> np.ndarray:
        return self.target.logits(x, self.settings.batch_size).argmax(1)

    def clean(self) -> dict[str, Any]:
        preds, torch_preds = [], []
        for i, (a, b) in enumerate(self.chunks):
            self._seed("clean", i)
            preds.append(self.predict(self.x[a:b]))
            if self.target.kind == "onnx" and self.target.source is not None:
                torch_preds.append(torch_logits(self.target.source.module, self.x[a:b]).argmax(1))
        pred = np.concatenate(preds)
        y = self.y.numpy()
        out = {"accuracy": float((pred == y).mean() * 100), "correct": (pred == y).tolist()}
        if torch_preds:
            tp = np.concatenate(torch_preds)
            out["accuracy_pytorch"] = float((tp == y).mean() * 100)
            out["agreement"] = float((tp == pred).mean() * 100)
        return out

    # -- the attacks --------------------------------------------------------------------------------------------
    def run(self, rows: list[Row], eps_list: list[tuple[str, float]], clean_correct: list[bool]) -> list[RowResult]:
        from tqdm import tqdm

        results = [RowResult(r.name, r.family, r.config) for r in rows]
        total = sum(applies(r, eps) for r in rows for _, eps in eps_list) * len(self.chunks)
        bar = tqdm(total=total, desc="eval", unit="chunk", disable=not self.progress, dynamic_ncols=True)
        clean = np.asarray(clean_correct, dtype=bool)
        try:
            for row, result in zip(rows, results, strict=True):
                for label, eps in eps_list:
                    if not applies(row, eps):
                        continue
                    correct, agree, queries, seconds = [], [], [], 0.0
                    for i, (a, b) in enumerate(self.chunks):
                        bar.set_description(f"{row.name} eps {label} [{a}:{b}]")
                        entry = self._chunk(row, eps, i, _Postfix(bar) if self.progress else None)
                        correct += entry["correct"]
                        if entry.get("agree") is not None:
                            agree += entry["agree"]
                        queries += entry.get("queries") or []
                        seconds += entry["seconds"]
                        if self.keep_adversarial:
                            self._keep(label, row.name, a, entry, clean)
                        for w in entry["warnings"]:
                            if w not in result.warnings:
                                result.warnings.append(w)
                        bar.update(1)
                    robust = clean & np.asarray(correct, dtype=bool)
                    result.correct[label] = robust.tolist()
                    result.accuracy[label] = float(robust.mean() * 100)
                    result.success[label] = float((1 - robust.sum() / max(clean.sum(), 1)) * 100)
                    result.seconds[label] = seconds
                    if queries:
                        result.queries[label] = queries
                    if agree:
                        result.agreement[label] = float(np.mean(agree) * 100)
        finally:
            bar.close()
        return results

    def _key(self, config: dict, eps: float, i: int) -> str:
        return digest(
            {
                "target": self.target.identity,
                "images": self.chunk_digests[i],
                "attack": config,
                "eps": eps,
                "norm": self.settings.norm,
                "seed": self.settings.seed,
            }
        )

    def _chunk(self, row: Row, eps: float, i: int, progress=None) -> dict:
        key = self._key(row.config, eps, i)
        hit = self.cache.get(key)
        if hit is not None:
            if not self.keep_adversarial:
                return hit
            adv = self.cache.get_array(key)
            if adv is not None:
                return {**hit, "adv": adv}
        a, b = self.chunks[i]
        x, y = self.x[a:b], self.y[a:b]
        start = time.perf_counter()
        self._seed(key, "craft")
        adv, warnings, info = craft(row, x, y, eps, a, progress)
        check_budget(row.name, x, adv, eps, self.settings.norm)
        self._seed(key, "replay")
        pred = self.predict(adv)
        entry = {"correct": (pred == y.numpy()).tolist(), "agree": None, "warnings": warnings, **info}
        if self.target.kind == "onnx" and self.target.source is not None:
            tp = torch_logits(self.target.source.module, adv, self.settings.batch_size).argmax(1)
            entry["agree"] = (tp == pred).tolist()
        entry["seconds"] = time.perf_counter() - start
        if self.keep_adversarial:
            self.cache.put_array(key, adv.detach().cpu().numpy())
        self.cache.put(key, entry)
        return {**entry, "adv": adv.detach().cpu().numpy()} if self.keep_adversarial else entry

    def _keep(self, label: str, name: str, a: int, entry: dict, clean: np.ndarray) -> None:
        if label not in self.adversarial:
            self.adversarial[label] = np.zeros(tuple(self.x.shape), np.float32)
            self.fooled_by[label] = [None] * len(self.x)
        store, who = self.adversarial[label], self.fooled_by[label]
        for j, ok in enumerate(entry["correct"]):
            i = a + j
            fooled = bool(clean[i]) and not ok  # a clean mistake is no attack's success
            if who[i] is None or (who[i] == "" and fooled):
                store[i] = entry["adv"][j]
                who[i] = name if fooled else ""

    # -- sanity -------------------------------------------------------------------------------------------------
    def randomness(self, n: int = 100) -> dict[str, Any]:
        """Two forward passes of the deployed model on the same clean images, without reseeding."""
        x = self.x[:n]
        self._seed("randomness")
        first = self.target.logits(x, self.settings.batch_size)
        second = self.target.logits(x, self.settings.batch_size)
        return {
            "images": len(x),
            "max_abs_logit_diff": float(np.abs(first - second).max()),
            "prediction_flips": float((first.argmax(1) != second.argmax(1)).mean() * 100),
        }

    def large_eps(self, row: Row, n: int = 100) -> dict[str, Any]:
        """The strongest gradient attack of the suite at a budget nothing survives."""
        n = min(n, len(self.x))
        key = digest(
            {
                "sanity": row.config,
                "target": self.target.identity,
                "images": images_digest(self.x[:n], self.y[:n]),
                "eps": SANITY_EPS,
                "seed": self.settings.seed,
            }
        )
        hit = self.cache.get(key)
        if hit is None:
            x, y = self.x[:n], self.y[:n]
            self._seed(key, "craft")
            adv, _, _ = craft(row, x, y, SANITY_EPS)
            check_budget(row.name, x, adv, SANITY_EPS, self.settings.norm)
            self._seed(key, "replay")
            hit = {"attack": row.name, "eps": "64/255", "images": n}
            hit["accuracy"] = float((self.predict(adv) == y.numpy()).mean() * 100)
            self.cache.put(key, hit)
        return hit


class _Postfix:
    """A query-based attack's progress on the bar: the round and how many images it still attacks."""

    def __init__(self, bar) -> None:
        self.bar, self.last = bar, 0.0

    def __call__(self, round_: int, left: int, spent: int) -> None:
        now = time.monotonic()
        if now - self.last >= 0.5:
            self.last = now
            self.bar.set_postfix_str(f"round {round_}, {left} images left, {spent:,} queries", refresh=True)


QUERY_MARKS = (10, 100, 1000, 5000)


def query_stats(queries: list[int], robust: list[bool], budget: int | None) -> dict[str, Any]:
    """Per image queries of a query-based attack (0 where the clean image was already wrong): the median of the
    images it broke, and the % of the attacked images broken within 10, 100, ... queries."""
    q = np.asarray(queries)
    attacked = q > 0
    broken = attacked & ~np.asarray(robust, dtype=bool)
    marks = [m for m in QUERY_MARKS if budget is None or m < budget] + ([budget] if budget else [])
    total = max(int(attacked.sum()), 1)
    return {
        "attacked": int(attacked.sum()),
        "broken": int(broken.sum()),
        "median_queries_broken": float(np.median(q[broken])) if broken.any() else None,
        "mean_queries_broken": float(q[broken].mean()) if broken.any() else None,
        "success_by_queries": {str(m): float((broken & (q <= m)).sum() / total * 100) for m in marks},
        "per_image": q.tolist(),
    }


def worst_case(results: list[RowResult], eps_labels: list[str]) -> dict[str, dict[str, Any]]:
    """Per eps: the minimum accuracy over the attacks, which attack set it, and the per-image worst case (an image
    counts only if it survives every attack)."""
    out = {}
    for label in eps_labels:
        scored = [(r.accuracy[label], r.name) for r in results if label in r.accuracy]
        if not scored:
            continue
        acc, name = min(scored)
        every = np.logical_and.reduce([np.asarray(r.correct[label]) for r in results if label in r.correct])
        # Which images survive every attack: two models evaluated on the same images compare pairwise (McNemar).
        out[label] = {
            "accuracy": acc,
            "attack": name,
            "per_image": float(every.mean() * 100),
            "robust_indices": np.flatnonzero(every).tolist(),
        }
    return out


def sanity_warnings(
    results: list[RowResult],
    eps_labels: list[str],
    worst: dict[str, dict[str, Any]],
    randomness: dict[str, Any],
    target: Target,
    large: dict[str, Any] | None,
) -> list[str]:
    warnings = []
    for r in [*results, None]:
        if r is None:
            points = [(e, worst[e]["accuracy"]) for e in eps_labels if e in worst]
        else:
            points = [(e, r.accuracy[e]) for e in eps_labels if e in r.accuracy]
        name = "the worst case" if r is None else r.name
        for (e0, a0), (e1, a1) in zip(points, points[1:], strict=False):
            if a1 > a0 + TOLERANCE:
                warnings.append(
                    f"{name}: accuracy rises from {a0:.1f} % at eps {e0} to {a1:.1f} % at {e1}: "
                    "a larger budget never helps the model; the attack is failing (gradient masking?)"
                )
    if large is not None and large["accuracy"] > 1.0:
        warnings.append(
            f"{large['attack']} leaves {large['accuracy']:.1f} % accuracy at eps 64/255 on {large['images']} images: "
            "accuracy must fall to 0 as eps grows; gradients are masked or the attack is broken"
        )
    for label in eps_labels:
        white = [(r.accuracy[label], r.name) for r in results if r.family in GRADIENT_FAMILIES and label in r.accuracy]
        # Transfer, query-based and replayed attacks do not use the target's gradient: beating it says it is masked.
        others = [
            (r.accuracy[label], r.name, r.family)
            for r in results
            if r.family not in GRADIENT_FAMILIES and label in r.accuracy
        ]
        if white and others and min(others)[0] < min(white)[0] - TOLERANCE:
            acc, name, family = min(others)
            warnings.append(
                f"eps {label}: {family} attack {name} ({acc:.1f} %) beats every white-box "
                f"attack (best {min(white)[1]}, {min(white)[0]:.1f} %): the white-box gradients are masked"
            )
        plain = [r.accuracy[label] for r in results if r.name in ("pgd-ce", "pgd-margin") and label in r.accuracy]
        bpda = [(r.accuracy[label], r.name) for r in results if r.name.startswith("bpda") and label in r.accuracy]
        if plain and bpda and min(bpda)[0] < min(plain) - TOLERANCE:
            warnings.append(
                f"eps {label}: {min(bpda)[1]} ({min(bpda)[0]:.1f} %) beats plain PGD ({min(plain):.1f} %): "
                "NENNI's selection masks the true gradient; only the adaptive numbers are honest"
            )
    varies = randomness["max_abs_logit_diff"] > 0
    used_eot = any(r.config.get("eot", 1) > 1 or r.config.get("version") == "rand" for r in results)
    if varies and not used_eot:
        warnings.append(
            f"the model's outputs vary between forward passes (max logit difference "
            f"{randomness['max_abs_logit_diff']:.3g}, {randomness['prediction_flips']:.1f} % predictions flip) "
            "but no attack used EOT: the numbers overstate robustness"
        )
    if varies and not target.randomised:
        warnings.append("the model was expected to be deterministic but its outputs vary between forward passes")
    return warnings


def to_json(r: RowResult) -> dict[str, Any]:
    """The row's numbers; per image, only the indices of the images that survived (compact, and enough to pair)."""
    d = asdict(r)
    correct = d.pop("correct")
    queries = d.pop("queries")
    d["robust_indices"] = {label: np.flatnonzero(c).tolist() for label, c in correct.items()}
    if queries:
        budget = r.config.get("queries")
        d["queries"] = {label: query_stats(q, correct[label], budget) for label, q in queries.items()}
    return d


__all__ = ["PGD", "Cache", "Evaluation", "RowResult", "query_stats", "sanity_warnings", "to_json", "worst_case"]

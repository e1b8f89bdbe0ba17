"""Dense vs NENNI on the same images, paired: which images survive every attack under one model only.

Usage: python benchmarks/robustness_paired.py OUT_DIR [OUT_DIR ...] > paired.md
Reads the `nenni eval` JSON files of benchmarks/robustness_table.sh (ARCH-VARIANT.json) and compares every variant
with ARCH-dense.json on the images both were evaluated on, per eps: the difference of their worst cases per image
(an image counts only if it survives every attack run on that model) and the exact two-sided McNemar p-value over
the images that differ. With 1,000 images a difference of 2-3 points can be real; with 100 it cannot.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scipy.stats import binomtest


def survivors(report: dict, eps: str) -> set[int] | None:
    detail = report["worst_case_detail"].get(eps, {})
    return set(detail["robust_indices"]) if "robust_indices" in detail else None


def main() -> None:
    print("| model | variant | images | eps | dense % | variant % | diff (points) | variant only | dense only | p |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for out in map(Path, sys.argv[1:]):
        for dense_path in sorted(out.glob("*-dense.json")):
            arch = dense_path.stem.removesuffix("-dense")
            dense = json.loads(dense_path.read_text())
            for path in sorted(out.glob(f"{arch}-*.json")):
                if path == dense_path:
                    continue
                report = json.loads(path.read_text())
                n = min(report["data"]["images"], dense["data"]["images"])
                for eps in report["eps"]:
                    a, b = survivors(dense, eps), survivors(report, eps)
                    if a is None or b is None:
                        continue
                    a, b = {i for i in a if i < n}, {i for i in b if i < n}
                    only_variant, only_dense = len(b - a), len(a - b)
                    differ = only_variant + only_dense
                    p = binomtest(only_variant, differ, 0.5).pvalue if differ else 1.0
                    print(
                        f"| {arch} | {path.stem.removeprefix(arch + '-')} | {n} | {eps} | {len(a) / n * 100:.1f} | "
                        f"{len(b) / n * 100:.1f} | {(len(b) - len(a)) / n * 100:+.1f} | {only_variant} | "
                        f"{only_dense} | {p:.2g} |"
                    )


if __name__ == "__main__":
    main()

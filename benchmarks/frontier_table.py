"""The frontier table (markdown) and plot from results/frontier/index.json, plus latency where
benchmarks/frontier_check.sh has written bench JSONs.

    python benchmarks/frontier_table.py [--index results/frontier/index.json] [--check runs/frontier-check]
        [--plot docs/figures/frontier-resnet20.png]

Prints the markdown table; with --plot also draws accuracy against the MAC ratio (and against measured batch-1
latency relative to dense when the bench files exist), NENNI vs pruning vs dense.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DENSE = {"resnet20": 91.73, "resnet56": 93.39}  # the shared checkpoints on the full test set


def speedup(check: Path, name: str, batch: int) -> float | None:
    """Dense float32 latency / this export's, from frontier_check.sh's one interleaved bench, else from a later
    bench-*.json run of points that finished after it (None when absent)."""
    for path in [check / "bench.json", *sorted(check.glob("bench-*.json"))]:
        if not path.is_file():
            continue
        for row in json.loads(path.read_text()).get("batches", []):
            if row.get("batch") == batch and name in row.get("speedups", {}):
                return float(row["speedups"][name]["speedup"])
    return None


def _series(entry: dict) -> str:
    rounded = entry["method"] == "pruning" and "multiple of" in entry.get("granularity", "")
    return "pruning, widths x8" if rounded else entry["method"]


def accuracy(check: Path, name: str) -> float | None:
    path = check / f"{name}.predict.json"
    return json.loads(path.read_text())["accuracy"] if path.is_file() else None


def _pair(check: Path, label: str) -> str:
    s1, s64 = speedup(check, label, 1), speedup(check, label, 64)
    return f"{s1:.2f}x / {s64:.2f}x" if s1 and s64 else "not measured"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", type=Path, default=Path("results/frontier/index.json"))
    ap.add_argument("--check", type=Path, default=Path("runs/frontier-check"))
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    entries = json.loads(args.index.read_text())
    lines = [
        "| point | method | budget | MACs (of dense) | BitOPs (of dense) | accuracy % | vs dense | epochs | "
        "ORT speedup b1 / b64 | int8 accuracy % | int8 speedup b1 / b64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in sorted(entries, key=lambda e: (e["architecture"], e["budget_metric"], -e["budget"], e["method"])):
        dense = DENSE.get(e["architecture"])
        gap = f"{e['accuracy'] - dense:+.2f}" if dense is not None else "-"
        fast, fast8 = (_pair(args.check, e["name"] + suffix) for suffix in ("", "-int8"))
        acc8 = accuracy(args.check, e["name"] + "-int8")
        lines.append(
            f"| {e['name']} | {e['method']} ({e['granularity']}) | {e['budget_metric']} {e['budget']:g} | "
            f"{e['macs_ratio']:.3f} | {e.get('bitops_ratio', float('nan')):.3f} | {e['accuracy']:.2f} | "
            f"{gap} | {e.get('epochs')} | {fast} | {'-' if acc8 is None else f'{acc8:.2f}'} | {fast8} |"
        )
    dense8 = accuracy(args.check, "dense-resnet20-int8")
    if dense8 is not None:
        lines.append(
            f"| dense ResNet-20 | dense | - | 1 | 1 | {DENSE['resnet20']:.2f} | 0 | - | 1 (baseline) | {dense8:.2f} | "
            f"{_pair(args.check, 'dense-resnet20-int8')} |"
        )
    print("\n".join(lines))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax_speed) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        styles = {"nenni": "o", "pruning": "s", "pruning, widths x8": "D"}
        for series, marker in styles.items():
            members = [e for e in entries if _series(e) == series]
            pts = sorted((e["macs_ratio"], e["accuracy"]) for e in members)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, label=series)
            for suffix, fill in (("", "full"), ("-int8", "none")):
                fast = [(speedup(args.check, e["name"] + suffix, 1), e["accuracy"]) for e in members]
                fast = sorted((x, y) for x, y in fast if x)
                if fast:
                    ax_speed.plot(
                        *zip(*fast, strict=True),
                        marker=marker,
                        linestyle="",
                        fillstyle=fill,
                        color=ax.lines[-1].get_color(),
                        label=f"{series}{' int8' if suffix else ''}",
                    )
        for arch, acc in DENSE.items():
            if any(e["architecture"] == arch for e in entries):
                ax.plot([1.0], [acc], "k*", markersize=10, label=f"dense {arch}")
                ax_speed.plot([1.0], [acc], "k*", markersize=10, label=f"dense {arch} (baseline)")
        dense8 = speedup(args.check, "dense-resnet20-int8", 1), accuracy(args.check, "dense-resnet20-int8")
        if all(dense8):
            ax_speed.plot(*dense8, "k*", markersize=10, fillstyle="none", label="dense resnet20 int8")
        ax.set_xlabel("MACs, fraction of dense (nenni/cost.py)")
        ax.set_ylabel("test accuracy % (10,000 images)")
        ax_speed.set_xlabel("measured speedup over dense float32, ONNX Runtime CPU, batch 1")
        ax_speed.axvline(1.0, color="grey", linewidth=0.8)
        for a in (ax, ax_speed):
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

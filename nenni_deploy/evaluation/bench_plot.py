"""The benchmark's figure: latency distributions per batch size, and measured vs ideal speedup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import atomic_output


def plot_report(report: dict[str, Any], out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = report["batches"]
    labels = list(report["models"])
    paired = all("speedup" in b for b in batches)
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(11 if paired else 6, 4), squeeze=False)
    ax = axes[0][0]
    data, ticks, positions = [], [], []
    for i, b in enumerate(batches):
        for j, label in enumerate(labels):
            rounds = b["models"][label]["round_means_ms"]
            data.append([v / b["batch"] for v in rounds])
            positions.append(i * (len(labels) + 1) + j)
            ticks.append(f"{label}\nbatch {b['batch']}")
    ax.boxplot(data, positions=positions, widths=0.7)
    ax.set_xticks(positions, ticks, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per image (round means)")
    ax.set_title("latency per image")
    if paired:
        ax = axes[0][1]
        xs = [b["batch"] for b in batches]
        per_model = {label: [b.get("speedups", {"model": b["speedup"]})[label] for b in batches]
                     for label in batches[0].get("speedups", {"model": None})}  # fmt: skip
        ideals = report.get("ideals") or {"model": report.get("ideal", {})}
        for i, (label, points) in enumerate(per_model.items()):
            sp = [p["speedup"] for p in points]
            lo = [s - p["ci_low"] for s, p in zip(sp, points, strict=True)]
            hi = [p["ci_high"] - s for s, p in zip(sp, points, strict=True)]
            name = "measured" if len(per_model) == 1 else label
            ax.errorbar(xs, sp, yerr=[lo, hi], marker="o", capsize=4, color=f"C{i}", label=f"{name} (95 % CI)")
            ideal = ideals.get(label) or {}
            if ideal.get("mac"):
                ax.axhline(ideal["mac"], color=f"C{i}", linestyle="--", linewidth=0.8,
                           label=f"{name} MAC-ideal {ideal['mac']:.2f}x")  # fmt: skip
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup over baseline")
        ax.set_title("model vs baseline")
        ax.legend(fontsize=8)
    env = report.get("environment", {})
    fig.suptitle(
        f"{env.get('cpu_model', '')}, {env.get('intra_op_threads', '?')} threads, {env.get('provider', '')}", fontsize=8
    )
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

"""The evaluation's table (terminal and Markdown) and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import atomic_output


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per eps: clean accuracy, every attack's accuracy, the worst case and the attack that set it."""
    names = list(report["attacks"])
    headers = ["eps", "clean", *names, "worst case", "set by"]
    rows = []
    for label in report["eps"]:
        worst = report["worst_case_detail"].get(label, {})
        rows.append(
            [
                label,
                round(report["clean_accuracy"], 2),
                *(_cell(report["attacks"][n]["accuracy"].get(label)) for n in names),
                round(worst["accuracy"], 2) if worst else None,
                worst.get("attack"),
            ]
        )
    return headers, rows


def _cell(value: float | None) -> float | str:
    return "-" if value is None else round(value, 2)  # "-": the row does not apply at this budget


def query_lines(report: dict[str, Any]) -> list[str]:
    """For each query-based attack and eps: the median queries of the images it broke, and how many it broke
    within 10, 100, ... queries."""
    lines = []
    for name, r in report["attacks"].items():
        for label, q in (r.get("queries") or {}).items():
            median = q["median_queries_broken"]
            within = ", ".join(f"{v:.1f} % within {int(k):,}" for k, v in q["success_by_queries"].items())
            lines.append(
                f"{name} eps {label}: broke {q['broken']} of {q['attacked']} images, median "
                f"{'-' if median is None else f'{median:g}'} queries; {within}"
            )
    return lines


def write_plot(path: Path, report: dict[str, Any]) -> None:
    """Accuracy against eps per attack, the worst case in bold; written under a temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = report["eps"]
    xs = report["eps_values"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in report["attacks"].items():
        points = [(v, r["accuracy"][e]) for v, e in zip(xs, labels, strict=True) if e in r["accuracy"]]
        ax.plot(*zip(*points, strict=True), marker="o", lw=1, alpha=0.8, label=name)
    ax.plot(xs, [report["worst_case"][e] for e in labels], color="black", lw=3, marker="s", label="worst case")
    ax.axhline(report["clean_accuracy"], color="grey", ls="--", lw=1, label="clean")
    ax.set_xticks(xs, labels)
    ax.set_xlabel(f"eps ({report['norm']})")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{Path(report['target']['target']).name}: {report['data']['images']} images", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)

"""One Markdown table from the `nenni eval` JSON files of benchmarks/robustness_table.sh.

Usage: python benchmarks/robustness_summary.py OUT_DIR [--plot PNG] > table.md
Columns group the suite's rows: PGD-CS is the minimum over its layers and transfer the minimum over surrogates and
methods; "worst" is the minimum over every row (the honest robust accuracy) and "all" the images that survive
every attack. Accuracies are on the ONNX Runtime model, in percent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GROUPS = [
    ("PGD-CE", lambda n: n == "pgd-ce"),
    ("PGD-CW", lambda n: n == "pgd-margin"),
    ("AutoAttack", lambda n: n.startswith("autoattack")),
    ("BPDA exact", lambda n: n.startswith("bpda-exact")),
    ("BPDA approx", lambda n: n.startswith("bpda-approx")),
    ("EOT", lambda n: n.startswith("eot")),
    ("PGD-CS", lambda n: n.startswith("pgd-cs")),
    ("transfer", lambda n: n.startswith("transfer")),
]


def plot(out: Path, png: Path) -> None:
    """Worst-case robust accuracy per eps, one panel per model, one bar per variant (dense first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports: dict[str, dict[str, dict]] = {}
    for path in sorted(out.glob("*.json")):
        report = json.loads(path.read_text())
        if "worst_case" in report:
            arch, _, variant = path.stem.partition("-")
            reports.setdefault(arch, {})[variant] = report
    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4), squeeze=False)
    for ax, (arch, variants) in zip(axes[0], sorted(reports.items()), strict=True):
        names = sorted(variants, key=lambda v: (v != "dense", v))
        eps = variants[names[0]]["eps"]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = [variants[name]["worst_case"].get(e, float("nan")) for e in eps]
            bars = ax.bar([j + i * width for j in range(len(eps))], values, width, label=name)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(eps))], eps)
        images = variants[names[0]]["data"]["images"]
        ax.set(title=f"{arch}: worst case over every attack ({images} images)", xlabel="eps (Linf)", ylabel="%")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    out = Path(sys.argv[1])
    if "--plot" in sys.argv:
        plot(out, Path(sys.argv[sys.argv.index("--plot") + 1]))
    headers = ["model", "variant", "eps", "clean", *(g for g, _ in GROUPS), "worst", "set by", "all", "agree min"]
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for path in sorted(out.glob("*.json")):
        report = json.loads(path.read_text())
        if "worst_case" not in report:
            continue
        arch, _, variant = path.stem.partition("-")
        for eps in report["eps"]:
            cells = [arch, variant, eps, f"{report['clean_accuracy']:.1f}"]
            for _, match in GROUPS:
                values = [a["accuracy"][eps] for n, a in report["attacks"].items() if match(n)]
                cells.append(f"{min(values):.1f}" if values else "n/a")
            agreements = [a["agreement"][eps] for a in report["attacks"].values() if a.get("agreement")]
            cells += [
                f"**{report['worst_case'][eps]:.1f}**",
                report["worst_case_attack"][eps],
                f"{report['worst_case_per_image'][eps]:.1f}",
                f"{min(agreements):.1f}" if agreements else "-",
            ]
            print("| " + " | ".join(cells) + " |")
    print()
    for path in sorted(out.glob("*.json")):
        report = json.loads(path.read_text())
        s = report.get("settings", {})
        eot = sorted({a["config"].get("eot", 1) for a in report["attacks"].values()} - {1})
        aa = [a["config"] for a in report["attacks"].values() if a["config"].get("attack") == "autoattack"]
        aa_text = (
            f"AutoAttack {aa[0]['version']} {','.join(aa[0]['attacks'] or [])} {aa[0]['iterations'] or 100} iterations"
            if aa
            else "no AutoAttack"
        )
        compute = sum(sum(a["seconds"].values()) for a in report["attacks"].values())
        print(
            f"- {path.stem}: {report['data']['images']} images; attack time {compute:.0f} s (summed over its cached "
            f"chunks, including earlier interrupted runs), last invocation {report['seconds']:.0f} s; "
            f"PGD steps {s.get('steps')}, "
            f"restarts {s.get('restarts')}, EOT {eot[0] if eot else 'none (deterministic)'}, {aa_text}, "
            f"transfer steps {s.get('transfer_steps')}; attacks: {', '.join(report['attacks'])}; skipped: "
            + ("; ".join(f"{k} ({v})" for k, v in report["skipped"].items()) or "none")
        )
        for w in report["sanity"]["warnings"]:
            print(f"  - WARNING: {w}")


if __name__ == "__main__":
    main()

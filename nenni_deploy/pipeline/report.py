"""The pipeline's report folder: one summary (JSON) and one page (Markdown) over the JSON every stage wrote.

Every number here is read from a stage's own output; a stage that did not run leaves its section out."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from ..files import atomic_output
from ..tables import format_table
from .config import PipelineConfig
from .stages import Layout

# The stage outputs the report reads, by their Layout name; each is read once per report.
SOURCES = ("train_json", "calibrate_json", "finetune_json", "prune_json", "check_json", "bench_json",
           "eval_nenni_json", "eval_dense_json", "eval_pruned_json")  # fmt: skip
# The models a report compares, by the label their rows carry; "pruned" only with a [prune] stage.
MODELS = ("nenni", "dense", "pruned")
NAMES = {"dense": "dense", "nenni": "NENNI", "pruned": "pruned"}  # how tables name them, in their column order


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _accuracy(js: dict[str, dict | None]) -> dict[str, Any]:
    cal = js["calibrate_json"] or {}
    train, ft, check, pruned = js["train_json"], js["finetune_json"], js["check_json"], js["prune_json"]
    acc = {
        "images": cal.get("eval_images"),
        "dense": cal.get("dense_accuracy"),
        "dense_trained_full_test": train.get("test_accuracy") if train else None,
        "nenni_calibrated": cal.get("nenni_accuracy"),
        "nenni_finetuned": ft.get("nenni_accuracy_after") if ft else None,
        "base_after_finetune": ft.get("exact_accuracy_after") if ft else None,
        "pruned": pruned.get("pruned_accuracy_after") if pruned else None,
        "pruned_images": pruned.get("eval_images") if pruned else None,
    }
    if check:
        acc["onnx"] = {
            "images": check["images"],
            "nenni_pytorch": check["accuracy_torch"],
            "nenni_onnx_runtime": check["accuracy_onnx"],
            "top1_agreement": check["agreement"],
            "max_abs_diff": check["max_abs_diff"],
            "passed": check["passed"],
        }
    return acc


def _cost(js: dict[str, dict | None]) -> dict[str, Any]:
    totals = ((js["calibrate_json"] or {}).get("cost") or {}).get("totals", {})
    keys = ("macs_dense", "macs_nenni", "mac_reduction", "bitops_dense", "bitops_nenni", "bitops_reduction")
    cost = {k: totals.get(k) for k in keys}
    pruning = (js["prune_json"] or {}).get("pruning") or {}
    cost["macs_pruned"] = pruning.get("macs_pruned")
    cost["pruned_mac_reduction"] = 1 - pruning["macs_ratio"] if "macs_ratio" in pruning else None
    return cost


def _speed(js: dict[str, dict | None]) -> dict[str, Any] | None:
    bench = js["bench_json"]
    if bench is None:
        return None
    rows = []
    for b in bench["batches"]:
        # one file is labelled "model"; with the pruned export beside it, each file is labelled by its name
        labels = [label for label in b["models"] if label != "baseline"]
        sp, ideal, load = b.get("speedup") or {}, b.get("ideal") or {}, b.get("load") or {}
        row = {
            "batch": b["batch"],
            "dense_ms": b["models"]["baseline"]["mean_ms"],
            "nenni_ms": b["models"][labels[0]]["mean_ms"],
            "dense_p99_ms": b["models"]["baseline"]["p99_ms"],
            "nenni_p99_ms": b["models"][labels[0]]["p99_ms"],
            "speedup": sp.get("speedup"),
            "ci_low": sp.get("ci_low"),
            "ci_high": sp.get("ci_high"),
            "mac_ideal": ideal.get("mac_speedup"),
            "fraction_of_mac_ideal": ideal.get("fraction_of_mac_ideal"),
            "other_load_cores": load.get("other_processes_busy_cores"),
        }
        if len(labels) > 1:
            psp = (b.get("speedups") or {}).get(labels[1]) or {}
            row.update(
                pruned_ms=b["models"][labels[1]]["mean_ms"],
                pruned_speedup=psp.get("speedup"),
                pruned_ci_low=psp.get("ci_low"),
                pruned_ci_high=psp.get("ci_high"),
            )
        rows.append(row)
    env = bench.get("environment", {})
    return {
        "provider": env.get("provider"),
        "threads": env.get("intra_op_threads"),
        "cpu": env.get("cpu_model"),
        "batches": rows,
    }


def _robustness(js: dict[str, dict | None]) -> dict[str, Any] | None:
    if js["eval_nenni_json"] is None or js["eval_dense_json"] is None:
        return None
    evals = {m: js[f"eval_{m}_json"] for m in MODELS if js[f"eval_{m}_json"] is not None}
    nenni = evals["nenni"]
    per_eps = []
    for label in nenni["eps"]:
        row = {"eps": label}
        for m, e in evals.items():
            row[f"{m}_worst"] = e["worst_case"].get(label)
            row[f"{m}_set_by"] = e["worst_case_attack"].get(label)
        per_eps.append(row)
    return {
        "images": nenni["data"]["images"],
        "norm": nenni["norm"],
        "models": list(evals),
        "clean": {m: e["clean_accuracy"] for m, e in evals.items()},
        "per_eps": per_eps,
        "attacks": {m: {n: a["accuracy"] for n, a in e["attacks"].items()} for m, e in evals.items()},
        "skipped": {m: e["skipped"] for m, e in evals.items()},
        "warnings": [f"{m}: {w}" for m, e in evals.items() for w in e["sanity"]["warnings"]],
        "randomised": nenni["target"].get("randomised"),
    }


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def headline(s: dict[str, Any]) -> list[str]:
    acc, cost = s["accuracy"], s["cost"]
    nenni = acc["nenni_finetuned"] if acc["nenni_finetuned"] is not None else acc["nenni_calibrated"]
    lines = [
        f"accuracy: dense {_fmt(acc['dense'])} %, NENNI {_fmt(nenni)} %"
        + (f" (calibrated only: {_fmt(acc['nenni_calibrated'])} %)" if acc["nenni_finetuned"] is not None else ""),
        f"cost: {_fmt((cost['mac_reduction'] or 0) * 100, '.1f')} % fewer MACs, "
        f"{_fmt((cost['bitops_reduction'] or 0) * 100, '.1f')} % fewer BitOPs than dense",
    ]
    if acc.get("pruned") is not None:
        lines.append(
            f"static pruning (torch-pruning): {_fmt(acc['pruned'])} % with "
            f"{_fmt((cost['pruned_mac_reduction'] or 0) * 100, '.1f')} % fewer MACs"
        )
    if "onnx" in acc:
        o = acc["onnx"]
        lines.append(f"ONNX Runtime vs PyTorch: {_fmt(o['top1_agreement'])} % top-1 agreement on {o['images']} images")
    if s["speed"]:
        parts = [
            f"batch {r['batch']}: {_fmt(r['speedup'], '.2f')}x (MAC-ideal {_fmt(r['mac_ideal'], '.2f')}x)"
            + (f", pruned {_fmt(r['pruned_speedup'], '.2f')}x" if "pruned_speedup" in r else "")
            for r in s["speed"]["batches"]
        ]
        lines.append("measured speedup over dense in ONNX Runtime: " + ", ".join(parts))
    if s["robustness"]:
        parts = [
            f"eps {r['eps']}: "
            + ", ".join(f"{NAMES[m]} {_fmt(r[f'{m}_worst'], '.1f')} %" for m in NAMES if f"{m}_worst" in r)
            for r in s["robustness"]["per_eps"]
        ]
        lines.append("worst-case robust accuracy: " + "; ".join(parts))
    ran = [name for name, stage in s["stages"].items() if stage["status"] == "ran"]
    if ran:
        lines.append(f"total time {s['seconds']:.0f} s ({', '.join(ran)} ran)")
    else:
        lines.append("up to date: nothing ran (the numbers are the earlier run's)")
    return lines


def summarise(cfg: PipelineConfig, stages: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    lay = Layout(cfg.out)
    js = {name: _load(getattr(lay, name)) for name in SOURCES}
    cal = js["calibrate_json"] or {}
    s: dict[str, Any] = {
        "schema": "nenni-pipeline",
        "schema_version": 1,
        "config": cfg.source,
        "data": cfg.data,
        "arch": cfg.arch,
        "weights": str(cfg.weights) if cfg.weights else None,
        "nenni_config": cal.get("config"),
        "accuracy": _accuracy(js),
        "cost": _cost(js),
        "speed": _speed(js),
        "robustness": _robustness(js),
        "stages": {k: {"status": v["status"], "seconds": v.get("seconds")} for k, v in stages.items()},
        "machine": {"cpu_count": len(os.sched_getaffinity(0)), "platform": platform.platform()},
        "seconds": seconds,
    }
    s["headline"] = headline(s)
    return s


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    return format_table(headers, rows, markdown=True)


def markdown(s: dict[str, Any], lay: Layout) -> str:
    acc, cost = s["accuracy"], s["cost"]
    out = [f"# nenni pipeline report: {s['arch']} on {s['data']}", "", "## Headline", ""]
    out += [f"- {line}" for line in s["headline"]]
    out += ["", "## Accuracy and cost", ""]
    rows = [["dense", _fmt(acc["dense"]), f"{cost['macs_dense']:,}" if cost["macs_dense"] else "-"]]
    rows.append(["NENNI, calibrated only", _fmt(acc["nenni_calibrated"]), _int(cost["macs_nenni"])])
    if acc["nenni_finetuned"] is not None:
        rows.append(["NENNI, fine-tuned", _fmt(acc["nenni_finetuned"]), _int(cost["macs_nenni"])])
        rows.append(["its base weights, every layer exact", _fmt(acc["base_after_finetune"]), _int(cost["macs_dense"])])
    if acc.get("pruned") is not None:
        images = "" if acc["pruned_images"] == acc["images"] else f" (on {acc['pruned_images']} images)"
        rows.append(
            ["static pruning (torch-pruning), fine-tuned", _fmt(acc["pruned"]) + images, _int(cost["macs_pruned"])]
        )
    out.append(_table(["model", f"test accuracy % ({acc['images']} images)", "MACs / image"], rows))
    out += [
        "",
        f"MACs {_fmt((cost['mac_reduction'] or 0) * 100, '.1f')} % fewer, BitOPs "
        f"{_fmt((cost['bitops_reduction'] or 0) * 100, '.1f')} % fewer (the projection is charged as dense float "
        "MACs; BitOPs count the exact path at W8A8 and the approximator at its bit width).",
        "",
        "NENNI settings: `" + json.dumps(s["nenni_config"]) + "`",
    ]
    if "onnx" in acc:
        o = acc["onnx"]
        out += [
            "",
            f"ONNX export (`nenni check`, {o['images']} test images): PyTorch {_fmt(o['nenni_pytorch'])} %, "
            f"ONNX Runtime {_fmt(o['nenni_onnx_runtime'])} %, top-1 agreement {_fmt(o['top1_agreement'])} %, "
            f"max |logit difference| {o['max_abs_diff']:.2e}: {'passed' if o['passed'] else 'FAILED'}.",
        ]
    if s["speed"]:
        sp = s["speed"]
        out += ["", "## Speed (`nenni bench`, the exports interleaved in one run)", ""]
        pruned = any("pruned_ms" in r for r in sp["batches"])
        rows = [
            [r["batch"], _fmt(r["dense_ms"], ".3f"), _fmt(r["nenni_ms"], ".3f"),
             f"{_fmt(r['speedup'])}x [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]", _fmt(r["mac_ideal"]),
             _fmt(r["fraction_of_mac_ideal"])]
            + ([_fmt(r.get("pruned_ms"), ".3f"),
                f"{_fmt(r.get('pruned_speedup'))}x [{_fmt(r.get('pruned_ci_low'))}, {_fmt(r.get('pruned_ci_high'))}]"]
               if pruned else [])
            + [_fmt(r["other_load_cores"])]
            for r in sp["batches"]
        ]  # fmt: skip
        headers = ["batch", "dense ms", "NENNI ms", "speedup [95 % CI]", "MAC-ideal", "of ideal"]
        headers += ["pruned ms", "pruned speedup [95 % CI]"] if pruned else []
        out.append(_table([*headers, "other load (cores)"], rows))
        out += [
            "",
            f"ONNX Runtime {sp['provider']} provider, {sp['threads']} threads, {sp['cpu']}. Latency is the mean per "
            "run of the whole batch; other load above a few tenths of a core makes absolute times unreliable, "
            "the ratio still compares both models under the same conditions.",
            "",
            f"![latency]({lay.bench_png.name})",
        ]
    if s["robustness"]:
        r = s["robustness"]
        out += ["", f"## Robustness (`nenni eval`, {r['images']} test images, {r['norm']})", ""]
        out.append(
            "Attacks differentiate each model's PyTorch source; every adversarial image is replayed on the exported "
            "ONNX model in ONNX Runtime, whose accuracy is reported. The worst case (minimum over every attack that "
            "applies) is the robust accuracy to quote."
        )
        out += [""]
        models = r.get("models", ["nenni", "dense"])
        shown = [m for m in NAMES if m in models]
        rows = [[e["eps"], *(v for m in shown for v in (_fmt(e[f"{m}_worst"]), e[f"{m}_set_by"]))]
                for e in r["per_eps"]]  # fmt: skip
        out.append(_table(["eps", *(h for m in shown for h in (f"{NAMES[m]} worst %", "set by"))], rows))
        for label in models:
            attacks = r["attacks"][label]
            out += ["", f"Every attack, {label} (clean {_fmt(r['clean'][label])} %):", ""]
            eps = [e["eps"] for e in r["per_eps"]]
            out.append(_table(["attack", *eps], [[n, *(_fmt(a.get(e)) for e in eps)] for n, a in attacks.items()]))
            skipped = [f"- not run: {name}: {why}" for name, why in r["skipped"][label].items()]
            out += ["", *skipped] if skipped else []
        pngs = {"nenni": lay.eval_nenni_png, "dense": lay.eval_dense_png, "pruned": lay.eval_pruned_png}
        out += ["", " ".join(f"![{label}]({pngs[label].name})" for label in models)]
        if r["warnings"]:
            out += ["", "### Sanity-check warnings", ""] + [f"- {w}" for w in r["warnings"]]
    out += ["", "## Stages", ""]
    out.append(_table(["stage", "status", "seconds"], [[k, v["status"], _fmt(v["seconds"], ".1f")]
                                                        for k, v in s["stages"].items()]))  # fmt: skip
    out += [
        "",
        f"Config: `{s['config']}`. Every stage's own JSON is beside this page (train.json, calibrate.json, "
        "finetune.json, prune.json, export-*.json, check.json, bench.json, eval-*.json); models in dense/, "
        "nenni-calibrated/, nenni/, pruned/ and the .onnx files.",
    ]
    return "\n".join(out) + "\n"


def _int(v: Any) -> str:
    return "-" if v is None else f"{v:,}"


def write_report(cfg: PipelineConfig, summary: dict[str, Any]) -> tuple[Path, Path]:
    """summary.json and report.md in the output folder, each written whole or not at all."""
    lay = Layout(cfg.out)
    paths = (cfg.out / "summary.json", cfg.out / "report.md")
    with atomic_output(paths[0]) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with atomic_output(paths[1]) as tmp:
        tmp.write_text(markdown(summary, lay))
    return paths

"""`nenni eval`: robust accuracy of a model as deployed, under white-box, adaptive, feature and transfer attacks,
reduced to an honest worst case with automatic sanity checks (method.md section 3)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import NenniError
from ..tables import format_table
from .options import apply_threads, json_option, write_json


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@click.command(name="eval")
@click.argument("target_spec", metavar="TARGET")
@click.option(
    "--weights",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Checkpoint when TARGET is a registered architecture name (a dense model).",
)
@click.option("--dense", is_flag=True, help="Evaluate the base model of a NENNI model directory (every layer exact).")
@click.option(
    "--source",
    type=click.Path(path_type=Path),
    default=None,
    help="For an ONNX TARGET: the model directory it was exported from (white-box attacks run on it).",
)
@click.option("--data", "data_name", type=click.Choice(["digits", "cifar10"]), default=None, help="Data set.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="CIFAR-10 folder.")
@click.option("--n", "count", type=click.IntRange(1), default=1000, show_default=True, help="First N test images.")
@click.option(
    "--attack",
    "attacks",
    default=None,
    help="Comma-separated: pgd, autoattack, bpda, eot, pgd-cs, transfer (default: every one that applies).",
)
@click.option(
    "--eps", "eps_text", default="8/255", show_default=True, help="Comma-separated budgets, e.g. 2/255,4/255."
)
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option(
    "--steps", type=click.IntRange(1), default=50, show_default=True, help="PGD steps (white-box, BPDA, EOT)."
)
@click.option(
    "--step-size",
    "alpha_factor",
    type=click.FloatRange(0, 100, min_open=True),
    default=2.5,
    show_default=True,
    help="PGD step as a multiple of eps / steps (2.5 crosses the ball from any start).",
)
@click.option("--restarts", type=click.IntRange(1), default=1, show_default=True)
@click.option("--eot-samples", type=click.IntRange(1), default=20, show_default=True, help="Noise draws per gradient.")
@click.option(
    "--aa-version",
    type=click.Choice(["auto", "standard", "rand", "custom"]),
    default="auto",
    show_default=True,
    help="AutoAttack version; auto: standard for deterministic models, rand for randomised ones.",
)
@click.option("--aa-attacks", default=None, help="With --aa-version custom: e.g. apgd-ce,apgd-t (a cheaper subset).")
@click.option("--aa-iters", type=click.IntRange(1), default=None, help="AutoAttack APGD/FAB iterations (default 100).")
@click.option(
    "--cs-layers",
    default=None,
    help="PGD-CS layers: names, or 'all' for each NENNI (else convolution) layer in turn; default: each stage.",
)
@click.option(
    "--surrogate",
    "surrogates",
    default=None,
    help="Surrogates besides base (always used for NENNI): a model DIR (DIR:dense for its base), ARCH=WEIGHTS.",
)
@click.option("--transfer-methods", default="pgd,mi-di", show_default=True, help="Of pgd, mifgsm, di, mi-di.")
@click.option("--transfer-steps", type=click.IntRange(1), default=20, show_default=True)
@click.option("--chunk", type=click.IntRange(1), default=100, show_default=True, help="Images per resumable unit.")
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of per-chunk results (resume); default: OUT.json.cache beside --json, else none.",
)
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Intra-op threads for PyTorch.")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=250, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PNG plot.")
@json_option()
def command(target_spec, **kw):
    """Robust accuracy of TARGET: a NENNI model directory, an exported .onnx (with --source), or ARCH --weights."""
    import torch

    from ..attacks.budget import parse_eps_list
    from ..data import load_dataset
    from ..evaluation.run import Cache, Evaluation, digest, images_digest, sanity_warnings, to_json, worst_case
    from ..evaluation.suite import Settings, parse_attacks, plan
    from ..evaluation.targets import describe, load_surrogates, load_target

    start = time.perf_counter()
    apply_threads(kw["threads"])
    norm = kw["norm"]
    eps_list = parse_eps_list(kw["eps_text"], norm)
    attacks = parse_attacks(kw["attacks"])
    if kw["aa_attacks"] and kw["aa_version"] not in ("auto", "custom"):
        raise NenniError("--aa-attacks chooses a custom AutoAttack subset: use it with --aa-version custom")
    if kw["aa_version"] == "custom" and not kw["aa_attacks"]:
        raise NenniError("--aa-version custom needs --aa-attacks, e.g. apgd-ce,apgd-t")
    settings = Settings(
        norm=norm,
        steps=kw["steps"],
        alpha_factor=kw["alpha_factor"],
        restarts=kw["restarts"],
        eot=kw["eot_samples"],
        aa_version=kw["aa_version"],
        aa_attacks=_split(kw["aa_attacks"]),
        aa_iters=kw["aa_iters"],
        cs_layers=_split(kw["cs_layers"]),
        transfer_steps=kw["transfer_steps"],
        transfer_methods=_split(kw["transfer_methods"]) or [],
        seed=kw["seed"],
        batch_size=kw["batch_size"],
    )
    for path in (kw["json_path"], kw["plot_path"]):
        if path is not None and Path(path).is_dir():
            raise NenniError(f"{path} is a directory: give a file name")

    target = load_target(target_spec, weights=kw["weights"], source=kw["source"], dense=kw["dense"])
    data_name = kw["data_name"] or target.dataset
    if not data_name:
        raise NenniError("the model records no data set: pass --data")
    if target.dataset and data_name != target.dataset:
        raise NenniError(f"the model is built for {target.dataset}, not --data {data_name}")
    ds = load_dataset(data_name, "test", kw["data_dir"])
    if kw["count"] > len(ds):
        raise NenniError(f"--n {kw['count']} is larger than the {data_name} test set ({len(ds)} images)")
    x, y = ds.x[: kw["count"]].float().contiguous(), ds.y[: kw["count"]]

    surrogate_specs = _split(kw["surrogates"]) or []
    if target.nenni and target.source is not None and "base" not in surrogate_specs:
        # The dense model with the same weights is always a surrogate: the attacker knows it for free.
        surrogate_specs.insert(0, "base")
    wants_transfer = attacks is None or "transfer" in attacks
    surrogates = load_surrogates(surrogate_specs, target) if wants_transfer else []
    rows, skipped = plan(target, attacks, settings, surrogates, tuple(x.shape[1:]))
    if not rows:
        raise NenniError("no attack applies to this target: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))

    cache_dir = kw["cache"] or (Path(f"{kw['json_path']}.cache") if kw["json_path"] else None)
    ev = Evaluation(target, x, y, settings, chunk=kw["chunk"], cache=Cache(cache_dir), progress=kw["progress"])
    torch.manual_seed(settings.seed)
    try:
        clean = ev.clean()
        results = ev.run(rows, eps_list, clean["correct"])
        randomness = ev.randomness()
        probe = _strongest_gradient_row(rows)
        large = ev.large_eps(probe) if probe is not None else None
    finally:
        target.close()
    labels = [label for label, _ in eps_list]
    worst = worst_case(results, labels)
    warnings = sanity_warnings(results, labels, worst, randomness, target, large)
    for r in results:
        warnings += [f"{r.name}: {w}" for w in r.warnings]

    report = {
        # One key for the whole run: the same model, images, attacks and budgets give the same key.
        "key": digest(
            {
                "target": target.identity,
                "images": images_digest(x, y),
                "attacks": [r.config for r in rows],
                "eps": [v for _, v in eps_list],
                "settings": settings.__dict__,
            }
        ),
        "target": describe(target),
        "data": {"name": data_name, "split": "test", "images": len(x), "first": len(x)},
        "norm": norm,
        "eps": labels,
        "eps_values": [v for _, v in eps_list],
        "clean_accuracy": clean["accuracy"],
        "clean_accuracy_pytorch": clean.get("accuracy_pytorch"),
        "clean_agreement": clean.get("agreement"),
        "attacks": {r.name: to_json(r) for r in results},
        "skipped": skipped,
        "worst_case": {k: v["accuracy"] for k, v in worst.items()},
        "worst_case_attack": {k: v["attack"] for k, v in worst.items()},
        "worst_case_per_image": {k: v["per_image"] for k, v in worst.items()},
        "worst_case_detail": worst,
        "settings": settings.__dict__,
        "sanity": {"randomness": randomness, "large_eps": large, "warnings": warnings},
        "cache": str(cache_dir) if cache_dir else None,
        "seconds": time.perf_counter() - start,
    }
    _print(report)
    if kw["plot_path"]:
        from ..evaluation.report import write_plot

        write_plot(kw["plot_path"], report)
        click.echo(f"wrote {kw['plot_path']}")
    if kw["json_path"]:
        write_json(kw["json_path"], report)
        click.echo(f"wrote {kw['json_path']}")


def _strongest_gradient_row(rows):
    """The gradient attack the large-eps check uses: BPDA (with EOT) on NENNI, EOT on noise, else PGD-CE."""
    for prefix in ("bpda-exact", "eot", "pgd-ce"):
        for r in rows:
            if r.name.startswith(prefix):
                return r
    return None


def _print(report) -> None:
    from ..evaluation.report import table_rows

    t = report["target"]
    kind = t["kind"] + (", randomised" if t["randomised"] else "")
    click.echo(f"target: {t['target']} ({kind}); {report['data']['images']} {report['data']['name']} test images")
    if report["clean_agreement"] is not None:
        click.echo(
            f"clean: ONNX Runtime {report['clean_accuracy']:.2f} %, PyTorch {report['clean_accuracy_pytorch']:.2f} %, "
            f"agreement {report['clean_agreement']:.2f} %"
        )
    headers, rows = table_rows(report)
    click.echo(format_table(headers, rows))
    agreements = {n: a["agreement"] for n, a in report["attacks"].items() if a["agreement"]}
    if agreements:
        parts = [f"{n} {min(a.values()):.1f}" for n, a in agreements.items()]
        click.echo("ONNX Runtime vs PyTorch agreement on adversarial images (%, min over eps): " + ", ".join(parts))
    for name, reason in report["skipped"].items():
        click.echo(f"skipped {name}: {reason}")
    for w in report["sanity"]["warnings"]:
        click.secho(f"WARNING: {w}", fg="red", bold=True, err=True)
    click.echo(f"{report['seconds']:.1f} s")

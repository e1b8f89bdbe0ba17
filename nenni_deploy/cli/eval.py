"""`nenni eval`: robust accuracy of a model as deployed, under white-box, adaptive, feature, transfer and
query-based attacks, reduced to an honest worst case with automatic sanity checks (method.md section 3).

A thin adapter: options -> (target, images, surrogates, config) -> `evaluation.api.evaluate` -> print / write.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import NenniError
from ..tables import format_table
from .options import (
    apply_threads,
    batch_size_option,
    data_options,
    json_option,
    progress_option,
    seed_option,
    threads_option,
    write_json,
)


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


PIXEL_OPTIONS = ("input_range", "mean", "std", "layout")


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
    help="For an ONNX TARGET exported by nenni: the model directory it came from (white-box attacks run on it). "
    "Without it, an ONNX TARGET is a black box: transfer from --surrogate and Square on the session.",
)
@click.option(
    "--input-range",
    type=click.Choice(["0-1", "0-255"]),
    default=None,
    help="Black-box ONNX: the pixel range the graph expects [default: 0-1]. The budget stays in [0, 1] units.",
)
@click.option("--mean", default=None, help="Black-box ONNX: per-channel mean to subtract, in the input range's units.")
@click.option("--std", default=None, help="Black-box ONNX: per-channel std to divide by, in the input range's units.")
@click.option(
    "--layout",
    type=click.Choice(["auto", "nchw", "nhwc"]),
    default=None,
    help="Black-box ONNX: the input layout [default: auto, read from the graph and the data].",
)
@data_options()
@click.option(
    "--n",
    "count",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="First N test images (all of them, with a note, when the test set is smaller).",
)
@click.option(
    "--preset",
    type=click.Choice(["quick", "standard", "full"]),
    default="full",
    show_default=True,
    help="quick: the cheapest attacks that still catch gradient masking (PGD-10, APGD-CE + APGD-DLR at 20 "
    "iterations, BPDA, EOT-5, transfer PGD-10; Square 1,000 queries); standard: PGD-20, APGD-CE + APGD-T, "
    "EOT-10, PGD-CS, Square 2,000; full: PGD-50, AutoAttack standard, EOT-20, Square 5,000. Options below "
    "override it.",
)
@click.option(
    "--attack",
    "attacks",
    default=None,
    help="Comma-separated: pgd, autoattack, bpda, eot, pgd-cs, transfer, square, hsj (default: the preset's, "
    "every one that applies; a black-box ONNX target gets transfer and square, or HopSkipJump (hsj) in Square's "
    "place when the graph outputs labels only).",
)
@click.option(
    "--eps", "eps_text", default="8/255", show_default=True, help="Comma-separated budgets, e.g. 2/255,4/255."
)
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--steps", type=click.IntRange(1), default=None, help="PGD steps (white-box, BPDA, EOT) [full: 50].")
@click.option(
    "--step-size",
    "alpha_factor",
    type=click.FloatRange(0, 100, min_open=True),
    default=2.5,
    show_default=True,
    help="PGD step as a multiple of eps / steps (2.5 crosses the ball from any start).",
)
@click.option("--restarts", type=click.IntRange(1), default=None, help="PGD restarts [1].")
@click.option("--eot-samples", type=click.IntRange(1), default=None, help="Noise draws per gradient [full: 20].")
@click.option(
    "--aa-version",
    type=click.Choice(["auto", "standard", "rand", "custom"]),
    default=None,
    help="AutoAttack version [full: auto, standard for deterministic models, rand for randomised ones].",
)
@click.option("--aa-attacks", default=None, help="With --aa-version custom: e.g. apgd-ce,apgd-t (a cheaper subset).")
@click.option("--aa-iters", type=click.IntRange(1), default=None, help="AutoAttack APGD/FAB iterations [full: 100].")
@click.option(
    "--cs-layers",
    default=None,
    help="PGD-CS layers: names, or 'all' for each NENNI (else convolution) layer in turn; default: each stage.",
)
@click.option(
    "--surrogate",
    "surrogates",
    multiple=True,
    help="Model to craft transfer attacks on (repeatable, or comma-separated): a model DIR (DIR:dense for its "
    "base), ARCH=WEIGHTS, or path/file.py:function=WEIGHTS; several also make an ensemble. base (the dense "
    "model of a NENNI target) is always used.",
)
@click.option("--transfer-methods", default=None, help="Of pgd, mifgsm, di, mi-di [full: pgd,mi-di].")
@click.option("--transfer-steps", type=click.IntRange(1), default=None, help="Transfer attack steps [full: 20].")
@click.option(
    "--queries",
    type=click.IntRange(1),
    default=None,
    help="Query budget per image of Square and HopSkipJump (Square's starting point included) [full: 5000].",
)
@click.option(
    "--adv-from",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Replay adversarial images crafted elsewhere: an npz with x (N, C, H, W in [0, 1]), y, optionally eps.",
)
@click.option(
    "--save-adv",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write per eps one adversarial image per image (the first attack that fooled it) as an npz that "
    "--adv-from reads.",
)
@click.option("--chunk", type=click.IntRange(1), default=100, show_default=True, help="Images per resumable unit.")
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of per-chunk results (resume); default: OUT.json.cache beside --json, else none.",
)
@threads_option("Intra-op threads (PyTorch and ORT).")
@batch_size_option(250)
@seed_option()
@progress_option()
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PNG plot.")
@json_option()
def command(target_spec, **kw):
    """Robust accuracy of TARGET: a NENNI model directory, ARCH --weights, an exported .onnx with --source, or
    any ONNX image classifier on its own (a black box: transfer from --surrogate and Square on the session)."""
    from ..app.evaluate import TargetSpec, data_for_target, evaluate_target, open_target
    from ..evaluation.advfile import save_adversarial
    from ..evaluation.api import EvalConfig, settings_for
    from ..evaluation.blackbox import split_specs
    from ..evaluation.suite import parse_attacks

    apply_threads(kw["threads"])
    settings = settings_for(
        kw["preset"],
        norm=kw["norm"],
        steps=kw["steps"],
        alpha_factor=kw["alpha_factor"],
        restarts=kw["restarts"],
        eot=kw["eot_samples"],
        aa_version=kw["aa_version"],
        aa_attacks=_split(kw["aa_attacks"]),
        aa_iters=kw["aa_iters"],
        cs_layers=_split(kw["cs_layers"]),
        transfer_steps=kw["transfer_steps"],
        transfer_methods=_split(kw["transfer_methods"]),
        queries=kw["queries"],
        seed=kw["seed"],
        batch_size=kw["batch_size"],
    )
    cache_dir = kw["cache"] or (Path(f"{kw['json_path']}.cache") if kw["json_path"] else None)
    config = EvalConfig(
        eps=kw["eps_text"],
        settings=settings,
        preset=kw["preset"],
        attacks=parse_attacks(kw["attacks"]),
        chunk=kw["chunk"],
        cache=cache_dir,
        progress=kw["progress"],
        keep_adversarial=kw["save_adv"] is not None,
    )
    for path in (kw["json_path"], kw["plot_path"], kw["save_adv"]):
        if path is not None and Path(path).is_dir():
            raise NenniError(f"{path} is a directory: give a file name")

    target = open_target(
        TargetSpec(
            target_spec,
            weights=kw["weights"],
            source=kw["source"],
            dense=kw["dense"],
            pixels=_pixels(kw),
            batch_size=kw["batch_size"],
            threads=kw["threads"],
        )
    )
    try:
        test = data_for_target(target, kw["data_name"], kw["data_dir"], kw["image_size"])
        report = evaluate_target(
            target,
            test,
            config,
            n=kw["count"],
            surrogates=split_specs(kw["surrogates"]),
            adv_from=kw["adv_from"],
            log=click.echo,
        )
    finally:
        target.close()
    payload = report.to_json()
    _print(payload)
    if kw["plot_path"]:
        from ..evaluation.report import write_plot

        write_plot(kw["plot_path"], payload)
        click.echo(f"wrote {kw['plot_path']}")
    if kw["save_adv"]:
        eps = dict(zip(report.eps, report.eps_values, strict=True))
        kept = {k: report.adversarial[k] for k in report.eps if k in report.adversarial}
        save_adversarial(kw["save_adv"], kept, report.fooled_by, report.labels, eps, report.norm)
        click.echo(f"wrote {kw['save_adv']}")
    if kw["json_path"]:
        write_json(kw["json_path"], payload)
        click.echo(f"wrote {kw['json_path']}")


def _pixels(kw):
    """The black-box pixel convention, when any of its options is given."""
    from ..runtime.classifier import PixelConvention, parse_channels

    if all(kw[o] is None for o in PIXEL_OPTIONS):
        return None
    return PixelConvention(
        input_range=kw["input_range"] or "0-1",
        mean=parse_channels(kw["mean"], "--mean"),
        std=parse_channels(kw["std"], "--std"),
        layout=kw["layout"] or "auto",
    )


def _print(report) -> None:
    from ..evaluation.report import query_lines, table_rows

    t = report["target"]
    kind = t["kind"] + (", randomised" if t["randomised"] else "")
    if t.get("classifier"):
        c = t["classifier"]
        kind += f", black box: {c['layout'].upper()} {c['output']}, {c['num_classes'] or '?'} classes"
    click.echo(f"target: {t['target']} ({kind}); {report['data']['images']} {report['data']['name']} test images")
    if report["clean_agreement"] is not None:
        click.echo(
            f"clean: ONNX Runtime {report['clean_accuracy']:.2f} %, PyTorch {report['clean_accuracy_pytorch']:.2f} %, "
            f"agreement {report['clean_agreement']:.2f} %"
        )
    headers, rows = table_rows(report)
    click.echo(format_table(headers, rows))
    for line in query_lines(report):
        click.echo(line)
    agreements = {n: a["agreement"] for n, a in report["attacks"].items() if a["agreement"]}
    if agreements:
        parts = [f"{n} {min(a.values()):.1f}" for n, a in agreements.items()]
        click.echo("ONNX Runtime vs PyTorch agreement on adversarial images (%, min over eps): " + ", ".join(parts))
    for name, reason in report["skipped"].items():
        click.echo(f"skipped {name}: {reason}")
    for w in report["sanity"]["warnings"]:
        click.secho(f"WARNING: {w}", fg="red", bold=True, err=True)
    click.echo(f"{report['seconds']:.1f} s")

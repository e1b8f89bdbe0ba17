"""`nenni prune`: static channel pruning with torch-pruning to a MAC budget, then fine-tuning with distillation
from the unpruned model; writes a pruned model directory that every other command takes."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (
    apply_threads,
    data_options,
    distill_weight_options,
    json_option,
    model_and_data,
    model_options,
    pop_train_config,
    progress_option,
    training_options,
    write_json,
)
from .train import check_writable_dir, epoch_line


@click.command(name="prune")
@model_options()
@data_options()
@click.option("--budget-macs", type=float, required=True, help="Fraction of the dense MACs to keep (e.g. 0.7).")
@click.option(
    "--importance",
    type=click.Choice(["l1", "taylor"]),
    default="l1",
    show_default=True,
    help="Channel importance: L1 norm of the weights, or first-order Taylor on a batch of training images.",
)
@click.option(
    "--round-to",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Keep every pruned width a multiple of this many channels: ONNX Runtime's blocked CPU convolutions "
    "(8 or 16 channels a block) and TensorRT's tensor cores (8 or 32) want whole multiples, and `nenni bench` "
    "reports the convolutions that miss the blocked layout; 1 keeps the exact widths.",
)
@training_options(epochs=None, lr=0.01)
@click.option(
    "--teacher",
    type=click.Choice(["dense", "none"]),
    default="dense",
    show_default=True,
    help="Distil from the unpruned model during fine-tuning, or train on the labels alone.",
)
@distill_weight_options()
@click.option("--eval-n", type=int, default=None, help="Test images to evaluate before and after (default all).")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Pruned model directory to write."
)
@progress_option()
@json_option()
def command(
    data_name, data_dir, image_size, budget_macs, importance, round_to, teacher, distill_alpha, distill_temperature,
    eval_n, out, progress, json_path, resume, **options,
):  # fmt: skip
    """Prune the dense model --arch names (a registered architecture or entry point with --weights, or a dense
    model directory) to --budget-macs of its MACs with torch-pruning, fine-tune it, write --out.

    Checkpoints live in OUT/train (continue with --resume; the pruned widths are kept in OUT/train/pruned-init).
    """
    from ..app.prune import PruneJob, prune_model
    from ..pruning import PruneConfig

    train_config = pop_train_config(options)
    job = PruneJob(
        PruneConfig(budget_macs=budget_macs, importance=importance, round_to=round_to, seed=train_config.seed),
        train_config,
        teacher=teacher,
        distill_alpha=distill_alpha,
        distill_temperature=distill_temperature,
        eval_n=eval_n,
        progress=progress,
    )
    apply_threads(train_config.threads)
    check_writable_dir(out)
    model, _, train_set, test_set = model_and_data(options, data_name, data_dir, image_size)
    run = prune_model(
        model,
        train_set,
        test_set,
        job,
        Path(out) / "train",
        resume=resume,
        on_epoch=lambda r: click.echo(epoch_line(r)),
        log=click.echo,
    )
    p, record = run.pruning, run.record
    click.echo(
        f"pruned ({p['mode']}, {importance}): {p['macs_ratio']:.3f} of dense MACs, "
        f"{p['params_pruned']:,} of {p['params_dense']:,} parameters, ratio {p['pruning_ratio']:.3f}"
        + (f", widths in multiples of {p['round_to']}" if p.get("round_to") else "")
    )
    if p["mode"] != "dependency-graph":
        click.echo(f"note: {p['note']}")
    run.save(out)
    spe = record["seconds_per_epoch"]
    click.echo(
        f"after {record['epochs']} epochs: pruned {record['pruned_accuracy_before']:.2f} -> "
        f"{record['pruned_accuracy_after']:.2f} % (dense {record['dense_accuracy']:.2f} %), "
        f"{p['macs_ratio']:.3f} of dense MACs" + (f", {spe:.1f} s/epoch" if spe else "") + f" -> {out}"
    )
    if json_path:
        write_json(json_path, run.to_json())

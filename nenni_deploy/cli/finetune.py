"""`nenni finetune`: train a NENNI model with its masks in the loop, then save it as a model directory."""

from __future__ import annotations

from pathlib import Path

import click

from .options import (
    DISTILL_OPTION_FIELDS,
    SCHEDULE_OPTION_FIELDS,
    allocation_options,
    apply_threads,
    data_options,
    distill_options,
    json_option,
    method_options,
    pop_allocation,
    pop_method,
    pop_train_config,
    progress_option,
    schedule_options,
    training_options,
    write_json,
)
from .train import check_writable_dir, epoch_line, init_distributed


@click.command(name="finetune")
@click.argument("model_dir", type=click.Path(path_type=Path))
@data_options()
@training_options(epochs=None, lr=0.01)
@method_options()
@click.option(
    "--train",
    "trainable",
    type=click.Choice(["both", "base", "approx"]),
    default="both",
    show_default=True,
    help="Which parameters train: base weights (all exact layers), the approximators, or both.",
)
@click.option(
    "--refit-every", type=int, default=0, show_default=True, help="Refit the approximators every N epochs (0 = never)."
)
@click.option("--refit-n", type=int, default=1024, show_default=True, help="Training images used by each refit.")
@distill_options()
@schedule_options()
@allocation_options()
@click.option("--eval-n", type=int, default=None, help="Test images to evaluate before and after (default all).")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Model directory to write."
)
@progress_option()
@json_option()
def command(
    model_dir, data_name, data_dir, image_size, trainable, refit_every, refit_n, eval_n, out, progress, json_path,
    resume, **options,
):  # fmt: skip
    """Fine-tune the NENNI model in MODEL_DIR with the NENNI forward pass; write the result to --out.

    Checkpoints, metrics.jsonl and curves.png live in OUT/train (continue with --resume); `torchrun` runs it
    data-parallel like `nenni train`. With an adversarial --method the attack runs through the NENNI forward
    pass, masks included (or through BPDA with --attack-via exact|approx), and the best epoch is the one with
    the highest PGD validation accuracy.
    """
    from ..app.finetune import TRAIN_SUBDIR, FinetuneConfig, finetune
    from ..nenni.allocation import format_allocation
    from ..nenni.model import data_for, open_model_dir

    schedule = {name: options.pop(name) for name in SCHEDULE_OPTION_FIELDS}
    train_config = pop_train_config(
        options, trainable=trainable, refit_every=refit_every, refit_images=refit_n, **schedule
    )
    config = FinetuneConfig(
        train_config,
        pop_method(options),
        **{name: options.pop(name) for name in DISTILL_OPTION_FIELDS},
        allocation=pop_allocation(options),
        eval_n=eval_n,
        progress=progress,
    )
    apply_threads(train_config.threads)
    rank = init_distributed()
    model = open_model_dir(model_dir)
    spec = data_for(model, data_name, data_dir, image_size)
    run_dir = Path(out) / TRAIN_SUBDIR
    check_writable_dir(run_dir)
    train_set, test_set = spec.load("train"), spec.load("test")
    model.data = spec
    result = finetune(
        model,
        train_set,
        test_set,
        config,
        run_dir,
        resume=resume,
        on_epoch=lambda r: click.echo(epoch_line(r)),
    )
    if rank != 0:
        return  # rank 0 writes the model directory
    if result.allocation is not None:
        click.echo(format_allocation(result.allocation))
    if result.result.resumed_from is not None:
        click.echo(f"resumed after epoch {result.result.resumed_from} from {run_dir}")
    result.save(out)
    click.echo(summary_line(result, out))
    if json_path:
        write_json(json_path, result.to_json())


def summary_line(result, out: Path) -> str:
    record, stats = result.record, result.fit_stats
    errors = [s["fit_rel_error"] for s in stats.values()]
    fit = f", mean fit error {sum(errors) / len(errors):.3f}" if errors else ""
    spe = record["seconds_per_epoch"]
    return (
        f"after {record['epochs']} epochs: NENNI {record['nenni_accuracy_before']:.2f} -> "
        f"{record['nenni_accuracy_after']:.2f} % (dense base {record['dense_accuracy']:.2f} %), exact layers "
        f"{record['exact_accuracy_before']:.2f} -> {record['exact_accuracy_after']:.2f} %{fit}"
        + (f", {spe:.1f} s/epoch" if spe is not None else "")
        + f" -> {out}"
    )

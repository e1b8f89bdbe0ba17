"""`nenni finetune`: train a NENNI model with its masks in the loop, then save it as a NENNI model directory.

The base weights train in their unfolded scale (ScaledConv2d/ScaledLinear keep the batch-norm factor as a
frozen buffer), which method.md 1.4 found decisive. After training, the residual RMS and fit error stored
per layer are re-measured with the new weights: they set the noise level of `--noise gaussian` models.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import click

from ..errors import NenniError
from .options import (
    apply_threads,
    data_options,
    json_option,
    method_options,
    pgd_validation,
    pop_method,
    pop_train_config,
    training_options,
    write_json_atomic,
)
from .recipe import (
    allocation_options,
    format_allocation,
    make_distill,
    pop_allocation_config,
    reallocate,
    resolve_teacher,
)
from .train import check_data_fits, check_writable_dir, epoch_line, init_distributed

TRAIN_SUBDIR = "train"
STATS_IMAGES = 1024  # training images used to re-measure the fit statistics after training


@click.command(name="finetune")
@click.argument("model_dir", type=click.Path(path_type=Path))
@data_options(default=None)
@training_options(epochs=2, lr=0.01)
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
@click.option(
    "--teacher",
    default="auto",
    show_default=True,
    help="Distillation teacher: dense-base (this model with every layer exact, frozen before training), a model "
    "directory of the same architecture, or none; auto: dense-base for --method standard, none otherwise.",
)
@click.option("--distill-alpha", type=float, default=0.9, show_default=True, help="Weight of the KL term (1 - CE's).")
@click.option("--distill-temperature", type=float, default=4.0, show_default=True, help="Softmax temperature T.")
@click.option(
    "--distill-features",
    type=float,
    default=0.0,
    show_default=True,
    help="Weight of feature distillation: each NENNI layer's output against the teacher's exact one (0 = off).",
)
@click.option(
    "--anneal-epochs",
    type=float,
    default=0.0,
    show_default=True,
    help="Lower the essential ratio linearly from 1.0 to each layer's target over this many epochs.",
)
@click.option(
    "--approx-lr-scale",
    type=float,
    default=1.0,
    show_default=True,
    help="The approximators' learning rate as a multiple of --lr.",
)
@click.option(
    "--train-scale/--no-train-scale",
    default=False,
    show_default=True,
    help="Also train the folded batch-norm factor of every exact layer (in its unfolded parametrisation).",
)
@click.option(
    "--scale-lr-scale",
    type=float,
    default=0.1,
    show_default=True,
    help="With --train-scale: the scales' learning rate as a multiple of --lr.",
)
@allocation_options()
@click.option("--eval-n", type=int, default=None, help="Test images to evaluate before and after (default all).")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="NENNI model directory to write."
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
@json_option()
def command(
    model_dir,
    data_name,
    data_dir,
    trainable,
    refit_every,
    refit_n,
    teacher,
    distill_alpha,
    distill_temperature,
    distill_features,
    anneal_epochs,
    approx_lr_scale,
    train_scale,
    scale_lr_scale,
    eval_n,
    out,
    progress,
    json_path,
    resume,
    **options,
):
    """Fine-tune the NENNI model in MODEL_DIR with the NENNI forward pass; write the result to --out.

    Checkpoints, metrics.jsonl and curves.png live in OUT/train (continue with --resume); `torchrun` runs it
    data-parallel like `nenni train`. With an
    adversarial --method the attack runs through the NENNI forward pass, masks included (or through BPDA
    with --attack-via exact|approx), and the best epoch is the one with the highest PGD validation accuracy.
    """
    import dataclasses

    from ..data import load_dataset
    from ..models import model_info
    from ..nenni.config import NenniConfig
    from ..nenni.io import load_nenni_model
    from ..nenni.layers import nenni_layers, set_mode
    from ..training import measure_fit, train
    from ..training.checkpoint import load_model
    from ..training.methods import method_record
    from ..training.refit import calibration_batches

    if eval_n is not None and eval_n < 1:
        raise NenniError(f"--eval-n must be >= 1, got {eval_n}")
    model, card = load_nenni_model(model_dir)
    nenni_config = NenniConfig.from_dict(card["nenni"])
    config = pop_train_config(
        options,
        trainable=trainable,
        refit_every=refit_every,
        refit_images=refit_n,
        refit_ridge=nenni_config.ridge,
        anneal_epochs=anneal_epochs,
        approx_lr_scale=approx_lr_scale,
        train_scale=train_scale,
        scale_lr_scale=scale_lr_scale,
    )
    allocation_config = pop_allocation_config(options)
    apply_threads(config.threads)
    rank = init_distributed()
    method, validation = pop_method(options, model, config.label_smoothing)
    if validation["n"]:
        config = dataclasses.replace(config, best_metric="pgd_acc")
    arch = card["arch"]
    info = model_info(arch)
    data_name = data_name or card.get("metrics", {}).get("data") or info.dataset
    run_dir = Path(out) / TRAIN_SUBDIR
    check_writable_dir(run_dir)
    train_set = load_dataset(data_name, "train", data_dir)
    test_set = load_dataset(data_name, "test", data_dir)
    check_data_fits(arch, info, train_set)
    input_shape = tuple(train_set.x.shape[1:])
    teacher_model = resolve_teacher(teacher, model, card, method, input_shape)
    allocation = None
    if allocation_config is not None:
        model, nenni_config, allocation = reallocate(
            model, nenni_config, allocation_config, train_set.x, train_set.y, run_dir, resume, progress
        )
        if rank == 0:
            click.echo(format_allocation(allocation))
    if teacher_model is not None:
        method = make_distill(
            teacher_model,
            teacher,
            model,
            alpha=distill_alpha,
            temperature=distill_temperature,
            feature_weight=distill_features,
            label_smoothing=config.label_smoothing,
        )
    test_x, test_y = (test_set.x[:eval_n], test_set.y[:eval_n]) if eval_n else (test_set.x, test_set.y)
    bar = "evaluating" if progress else None

    def evaluate(mode: str) -> float:
        from ..metrics import accuracy

        set_mode(model, mode)
        try:
            return accuracy(model, test_x, test_y, config.eval_batch_size, bar)
        finally:
            set_mode(model, "nenni")

    start = time.perf_counter()
    before = {"nenni_accuracy": evaluate("nenni"), "exact_accuracy": evaluate("exact")}
    if rank == 0:
        click.echo(f"before: NENNI {before['nenni_accuracy']:.2f} %  exact {before['exact_accuracy']:.2f} %")
    result = train(
        model,
        train_set.x,
        train_set.y,
        config,
        run_dir,
        method=method,
        validators=pgd_validation(validation, train_set.x, train_set.y, config),
        resume=resume,
        progress=progress,
        on_epoch=lambda r: click.echo(epoch_line(r, config.epochs)),
    )
    if rank != 0:
        return  # rank 0 measures, evaluates and writes the model directory
    if result.resumed_from is not None:
        click.echo(f"resumed after epoch {result.resumed_from} from {run_dir}")
    load_model(result.best_path, model)
    set_mode(model, "nenni")
    # The stored residual RMS sets the noise of gaussian models, so it must follow the new weights first.
    stats = measure_fit(model, calibration_batches(train_set.x, STATS_IMAGES, config.eval_batch_size))
    after = {"nenni_accuracy": evaluate("nenni"), "exact_accuracy": evaluate("exact")}
    seconds = time.perf_counter() - start
    record = {
        "stage": "finetune",
        "source": str(model_dir),
        "data": data_name,
        "method": method.name,
        "method_settings": method_record(method),
        "allocation": allocation.to_json() if allocation is not None else None,
        "trainable": trainable,
        "epochs": result.epoch,
        "steps": result.step,
        "best_epoch": result.best_epoch,
        "best_metric": config.best_metric,
        "best_value": result.best_value,
        "best_val_accuracy": result.best_value if config.best_metric == "val_acc" else None,
        "nenni_accuracy_before": before["nenni_accuracy"],
        "exact_accuracy_before": before["exact_accuracy"],
        "nenni_accuracy_after": after["nenni_accuracy"],
        "exact_accuracy_after": after["exact_accuracy"],
        "eval_images": len(test_x),
        "seconds": seconds,
        "seconds_per_epoch": result.seconds_per_epoch,
        "config": config.to_dict(),
    }
    metrics = {
        **card.get("metrics", {}),
        "dense_accuracy": after["exact_accuracy"],
        "nenni_accuracy": after["nenni_accuracy"],
        "eval_images": len(test_x),
        "data": data_name,
        "finetune": {k: v for k, v in record.items() if k not in ("stage", "config")},
    }
    specs = [layer.spec for layer in nenni_layers(model).values()]
    save_keeping_run(
        Path(out),
        run_dir,
        model,
        arch=arch,
        config=nenni_config,
        specs=specs,
        metrics=metrics,
        history=[*card.get("history", []), record],
    )
    click.echo(summary_line(record, stats, out))
    if json_path:
        write_json_atomic(
            json_path,
            {
                "arch": arch,
                "model_dir": str(model_dir),
                "out": str(out),
                **{k: v for k, v in record.items() if k != "stage"},
                "fit_stats": stats,
                "history": result.history,
            },
        )


def save_keeping_run(out: Path, run_dir: Path, model, **kwargs: Any) -> Path:
    """Write the NENNI model directory at `out` without losing the checkpoints in out/train.

    save_nenni_model replaces its target whole, so the model is written beside it, the run directory moved
    into the new one, and the new directory renamed into place.
    """
    from ..nenni.io import save_nenni_model

    out, run_dir = out.resolve(), run_dir.resolve()  # `--out .` has no name to stage beside
    staging = out.with_name(f".{out.name}.finetuned")
    shutil.rmtree(staging, ignore_errors=True)
    save_nenni_model(staging, model, **kwargs)
    try:
        os.replace(run_dir, staging / run_dir.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except OSError as exc:
        raise NenniError(f"cannot write {out}: {exc.strerror or exc} (the result is in {staging})") from None
    return out


def summary_line(record: dict[str, Any], stats: dict[str, dict[str, float]], out: Path) -> str:
    errors = [s["fit_rel_error"] for s in stats.values()]
    fit = f", mean fit error {sum(errors) / len(errors):.3f}" if errors else ""
    spe = record["seconds_per_epoch"]
    return (
        f"after {record['epochs']} epochs: NENNI {record['nenni_accuracy_before']:.2f} -> "
        f"{record['nenni_accuracy_after']:.2f} %, exact {record['exact_accuracy_before']:.2f} -> "
        f"{record['exact_accuracy_after']:.2f} %{fit}"
        + (f", {spe:.1f} s/epoch" if spe is not None else "")
        + f" -> {out}"
    )

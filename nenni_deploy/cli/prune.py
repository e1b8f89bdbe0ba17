"""`nenni prune`: static channel pruning with torch-pruning to a MAC budget, then fine-tuning with distillation
from the unpruned model; writes a pruned model directory that `nenni export` reads."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import click

from ..errors import NenniError
from .options import apply_threads, arch_option, data_options, json_option, training_options, write_json_atomic
from .train import check_data_fits, check_writable_dir, epoch_line

TRAIN_SUBDIR = "train"
INIT_SUBDIR = "pruned-init"  # the pruned, not yet fine-tuned model: a resumed run rebuilds its shapes from it


@click.command(name="prune")
@arch_option()
@click.option(
    "--weights",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Checkpoint of the dense model (.safetensors, or a torch file loaded with weights_only=True).",
)
@data_options(default=None)
@click.option("--budget-macs", type=float, required=True, help="Fraction of the dense MACs to keep (e.g. 0.7).")
@click.option(
    "--importance",
    type=click.Choice(["l1", "taylor"]),
    default="l1",
    show_default=True,
    help="Channel importance: L1 norm of the weights, or first-order Taylor on a batch of training images.",
)
@training_options(epochs=2, lr=0.01)
@click.option(
    "--teacher",
    type=click.Choice(["dense", "none"]),
    default="dense",
    show_default=True,
    help="Distil from the unpruned model during fine-tuning, or train on the labels alone.",
)
@click.option("--distill-alpha", type=float, default=0.9, show_default=True, help="Weight of the KL term.")
@click.option("--distill-temperature", type=float, default=4.0, show_default=True, help="Softmax temperature T.")
@click.option("--eval-n", type=int, default=None, help="Test images to evaluate before and after (default all).")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Pruned model directory to write."
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
@json_option()
def command(
    arch,
    weights,
    data_name,
    data_dir,
    budget_macs,
    importance,
    teacher,
    distill_alpha,
    distill_temperature,
    eval_n,
    out,
    progress,
    json_path,
    resume,
    **options,
):
    """Prune ARCH (--weights) to --budget-macs of its MACs with torch-pruning, fine-tune, write --out.

    Checkpoints live in OUT/train (continue with --resume; the pruned shapes are kept in OUT/train/pruned-init).
    """
    from ..data import load_dataset
    from ..metrics import accuracy
    from ..models import create_model, model_info
    from ..pruning import PruneConfig, load_pruned_model, prune, save_pruned_model
    from ..training import train
    from ..training.checkpoint import load_model
    from ..training.methods import Distill, Standard, method_record
    from .options import pop_train_config

    if eval_n is not None and eval_n < 1:
        raise NenniError(f"--eval-n must be >= 1, got {eval_n}")
    prune_config = PruneConfig(budget_macs=budget_macs, importance=importance, seed=options["seed"])
    config = pop_train_config(options)
    apply_threads(config.threads)
    info = model_info(arch)
    data_name = data_name or info.dataset
    out = Path(out)
    run_dir = out / TRAIN_SUBDIR
    check_writable_dir(run_dir)
    dense = create_model(arch, weights=weights)
    train_set = load_dataset(data_name, "train", data_dir)
    test_set = load_dataset(data_name, "test", data_dir)
    check_data_fits(arch, info, train_set)
    test_x, test_y = (test_set.x[:eval_n], test_set.y[:eval_n]) if eval_n else (test_set.x, test_set.y)
    bar = "evaluating" if progress else None
    start = time.perf_counter()

    init_dir = run_dir / INIT_SUBDIR
    if resume and (init_dir / "config.json").is_file():
        model, init_card = load_pruned_model(init_dir)
        pruning = init_card["pruning"]
        click.echo(f"resuming: pruned shapes from {init_dir}")
    else:
        result = prune(dense, train_set.x, train_set.y, prune_config)
        model, pruning = result.model, {**result.to_json(), "importance": importance, "budget_macs": budget_macs}
        save_pruned_model(init_dir, model, arch=arch, pruning=pruning)
    click.echo(
        f"pruned ({pruning['mode']}, {importance}): {pruning['macs_ratio']:.3f} of dense MACs, "
        f"{pruning['params_pruned']:,} of {pruning['params_dense']:,} parameters, ratio {pruning['pruning_ratio']:.3f}"
    )
    if pruning["mode"] != "dependency-graph":
        click.echo(f"note: {pruning['note']}")
    dense_acc = accuracy(dense, test_x, test_y, config.eval_batch_size, bar)
    before = accuracy(model, test_x, test_y, config.eval_batch_size, bar)
    click.echo(f"before fine-tuning: pruned {before:.2f} %  dense {dense_acc:.2f} %")
    if teacher == "dense":
        method = Distill(
            dense,
            alpha=distill_alpha,
            temperature=distill_temperature,
            label_smoothing=config.label_smoothing,
            teacher_name="dense",
        )
    else:
        method = Standard(label_smoothing=config.label_smoothing)
    result = train(
        model,
        train_set.x,
        train_set.y,
        config,
        run_dir,
        method=method,
        resume=resume,
        progress=progress,
        on_epoch=lambda r: click.echo(epoch_line(r, config.epochs)),
    )
    if result.resumed_from is not None:
        click.echo(f"resumed after epoch {result.resumed_from} from {run_dir}")
    load_model(result.best_path, model)
    after = accuracy(model, test_x, test_y, config.eval_batch_size, bar)
    record = {
        "stage": "prune",
        "weights": str(weights),
        "data": data_name,
        "method": method.name,
        "method_settings": method_record(method),
        "epochs": result.epoch,
        "steps": result.step,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_value,
        "dense_accuracy": dense_acc,
        "pruned_accuracy_before": before,
        "pruned_accuracy_after": after,
        "eval_images": len(test_x),
        "seconds": time.perf_counter() - start,
        "seconds_per_epoch": result.seconds_per_epoch,
        "config": config.to_dict(),
    }
    metrics = {
        "data": data_name,
        "dense_accuracy": dense_acc,
        "accuracy": after,
        "eval_images": len(test_x),
        "macs_ratio": pruning["macs_ratio"],
        "macs_dense": pruning["macs_dense"],
        "macs_pruned": pruning["macs_pruned"],
    }
    staging = out.resolve().with_name(f".{out.name}.pruned")
    shutil.rmtree(staging, ignore_errors=True)
    save_pruned_model(staging, model, arch=arch, pruning=pruning, metrics=metrics, history=[record])
    try:
        os.replace(run_dir, staging / TRAIN_SUBDIR)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except OSError as exc:
        raise NenniError(f"cannot write {out}: {exc.strerror or exc} (the result is in {staging})") from None
    spe = result.seconds_per_epoch
    click.echo(
        f"after {result.epoch} epochs: pruned {before:.2f} -> {after:.2f} % (dense {dense_acc:.2f} %), "
        f"{pruning['macs_ratio']:.3f} of dense MACs" + (f", {spe:.1f} s/epoch" if spe else "") + f" -> {out}"
    )
    if json_path:
        write_json_atomic(json_path, {**record, "pruning": pruning, "out": str(out), "history": result.history})

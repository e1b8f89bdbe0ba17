"""`nenni train`: train a registered architecture (from scratch or a checkpoint) with the shared training loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import NenniError
from .options import (
    apply_threads,
    arch_option,
    data_options,
    json_option,
    method_options,
    pgd_validation,
    pop_method,
    pop_train_config,
    training_options,
    write_json_atomic,
)

MODEL_FILE = "model.safetensors"


@click.command(name="train")
@arch_option()
@click.option(
    "--weights",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Initial weights (.safetensors or a torch file); default: random initialisation by --seed.",
)
@data_options(default=None)
@training_options(epochs=30, lr=0.1)
@method_options()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar per epoch.")
@json_option()
def command(arch, weights, data_name, data_dir, out, progress, json_path, resume, **options):
    """Train --arch on --data (default: the data set the architecture is built for) and write RUN_DIR.

    RUN_DIR gets last/best checkpoints (resume with --resume), metrics.jsonl, curves.png and model.safetensors
    (the best weights by validation accuracy, or by PGD accuracy on the validation split for adversarial
    methods; `--weights` of other commands reads it). Under `torchrun --nproc-per-node N` the run is
    data-parallel (DistributedDataParallel over gloo, on the CPU), --batch-size being the global batch.
    """
    import dataclasses

    import torch

    from ..data import load_dataset
    from ..metrics import accuracy
    from ..models import create_model, model_info, save_state_dict
    from ..training import train
    from ..training.checkpoint import load_model
    from ..training.methods import method_record

    config = pop_train_config(options)
    apply_threads(config.threads)
    rank = init_distributed()
    info = model_info(arch)
    data_name = data_name or info.dataset
    check_writable_dir(out)
    train_set = load_dataset(data_name, "train", data_dir)
    test_set = load_dataset(data_name, "test", data_dir)
    check_data_fits(arch, info, train_set)
    torch.manual_seed(config.seed)  # the initialisation, when there are no --weights
    model = create_model(arch, weights=weights)
    method, validation = pop_method(options, model, config.label_smoothing)
    if validation["n"]:
        config = dataclasses.replace(config, best_metric="pgd_acc")
    validators = pgd_validation(validation, train_set.x, train_set.y, config)

    def report(record: dict[str, Any]) -> None:
        click.echo(epoch_line(record, config.epochs))

    result = train(
        model,
        train_set.x,
        train_set.y,
        config,
        out,
        method=method,
        validators=validators,
        resume=resume,
        progress=progress,
        on_epoch=report,
    )
    if rank != 0:
        return  # rank 0 writes the model and the summary
    if result.resumed_from is not None:
        click.echo(f"resumed after epoch {result.resumed_from} from {out}")
    load_model(result.best_path, model)
    model_path = save_state_dict(model, out / MODEL_FILE)
    test_acc = accuracy(model, test_set.x, test_set.y, config.eval_batch_size)
    summary = {
        "arch": arch,
        "data": data_name,
        "method": method.name,
        "weights": str(weights) if weights else None,
        "epochs": result.epoch,
        "steps": result.step,
        "test_accuracy": test_acc,
        "method_settings": method_record(method),
        "best_metric": config.best_metric,
        "best_value": result.best_value,
        "best_val_accuracy": result.best_value if config.best_metric == "val_acc" else None,
        "best_epoch": result.best_epoch,
        "seconds_per_epoch": result.seconds_per_epoch,
        "run_dir": str(out),
        "model": str(model_path),
        "config": config.to_dict(),
        "history": result.history,
    }
    click.echo(summary_line(summary))
    if json_path:
        write_json_atomic(json_path, summary)


def init_distributed() -> int:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); return this process's rank."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.get_rank() if dist.is_initialized() else 0
    # gloo even where CUDA exists: the commands keep models and data on the CPU, and NCCL only moves GPU
    # tensors. NCCL belongs here once training gains a --device option.
    backend = "gloo"
    try:
        dist.init_process_group(backend)
    except (RuntimeError, ValueError) as exc:
        raise NenniError(f"cannot join the torchrun process group ({backend}): {exc}") from None
    return dist.get_rank()


def check_writable_dir(path: Path) -> None:
    """Fail before any work if the output directory cannot be created."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NenniError(f"cannot create output directory {path}: {exc.strerror or exc}") from None


def check_data_fits(arch: str, info, data) -> None:
    shape, classes = tuple(data.x.shape[1:]), data.num_classes
    if shape != tuple(info.input_shape) or classes != info.num_classes:
        raise NenniError(
            f"--arch {arch} takes {tuple(info.input_shape)} images in {info.num_classes} classes, "
            f"but --data {data.name} has {shape} in {classes}"
        )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} %"


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    extras = [
        f"{k} {v:.4g}"
        for k, v in record.items()
        if k.endswith("_acc") and k not in ("train_acc", "val_acc") and isinstance(v, (int, float))
    ]
    return "  ".join(
        [
            f"epoch {record['epoch']}/{epochs}",
            f"loss {record['train_loss']:.4f}",
            f"train {_pct(record['train_acc'])}",
            f"val {_pct(record.get('val_acc'))}",
            *extras,
            f"lr {record['lr']:.3g}",
            f"{record['seconds']:.1f} s",
        ]
    )


def summary_line(s: dict[str, Any]) -> str:
    spe = s["seconds_per_epoch"]
    best = "val" if s["best_metric"] == "val_acc" else s["best_metric"]
    return (
        f"{s['arch']} on {s['data']} ({s['method']}): {s['epochs']} epochs, best {best} {_pct(s['best_value'])} "
        f"(epoch {s['best_epoch']}), test {_pct(s['test_accuracy'])}"
        + (f", {spe:.1f} s/epoch" if spe is not None else "")
        + f" -> {s['model']}"
    )

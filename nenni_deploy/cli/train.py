"""`nenni train`: train a model (registered or your own, from scratch or a checkpoint) with the shared loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import NenniError
from .options import (
    apply_threads,
    data_options,
    json_option,
    method_options,
    model_and_data,
    model_options,
    pop_method,
    pop_train_config,
    progress_option,
    training_options,
    write_json,
)


@click.command(name="train")
@model_options()
@data_options()
@training_options(epochs=30, lr=0.1)
@method_options()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory.")
@progress_option()
@json_option()
def command(data_name, data_dir, image_size, out, progress, json_path, resume, **options):
    """Train --arch (a registered architecture, or your entry point file.py:FUNCTION) on --data (default: the data
    set the architecture is built for) and write RUN_DIR.

    RUN_DIR becomes a model directory (config.json, weights.safetensors: the best weights by validation accuracy,
    or by PGD accuracy on the validation split for adversarial methods) that `calibrate --arch`, `export`, `prune`
    and `eval` take, with last/best checkpoints (resume with --resume), metrics.jsonl and curves.png beside it.
    Under `torchrun --nproc-per-node N` the run is data-parallel (DistributedDataParallel over gloo, on the CPU),
    --batch-size being the global batch.
    """
    import torch

    from ..app.train import train_model

    config = pop_train_config(options)
    method = pop_method(options)
    apply_threads(config.threads)
    rank = init_distributed()
    check_writable_dir(out)
    torch.manual_seed(config.seed)  # the initialisation, when there are no --weights
    weights = options.get("weights")
    model, _, train_set, test_set = model_and_data(options, data_name, data_dir, image_size)
    run = train_model(
        model,
        train_set,
        test_set,
        config,
        out,
        method=method,
        resume=resume,
        progress=progress,
        on_epoch=lambda record: click.echo(epoch_line(record)),
        weights_label=str(weights) if weights else None,
    )
    if rank != 0:
        return  # rank 0 writes the model and the summary
    if run.result.resumed_from is not None:
        click.echo(f"resumed after epoch {run.result.resumed_from} from {out}")
    run.save()
    summary = run.to_json()
    click.echo(summary_line(summary))
    if json_path:
        write_json(json_path, summary)


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
    """Fail before any work if the output directory cannot be created (without creating it: a later error must
    leave nothing behind)."""
    import os

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NenniError(f"cannot create output directory {path}: a file of that name exists")
    existing = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise NenniError(f"cannot create output directory {path}: {existing} is not a writable folder")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} %"


def epoch_line(record: dict[str, Any]) -> str:
    extras = [
        f"{k} {v:.4g}"
        for k, v in record.items()
        if k.endswith("_acc") and k not in ("train_acc", "val_acc") and isinstance(v, (int, float))
    ]
    return "  ".join(
        [
            f"epoch {record['epoch']}/{record['epochs']}",
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
        + f" -> {s['run_dir']}"
    )

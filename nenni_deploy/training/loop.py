"""The one training loop: plain and NENNI models, from scratch or fine-tuning, with any `Method`.

A run directory holds checkpoints (see `checkpoint`), `metrics.jsonl` and `curves.png`. A run is resumable
at every epoch boundary and a resumed run computes exactly what an uninterrupted one would: the learning
rate is a function of the global step, and the momentum buffers and both RNG states are restored.

Under `torchrun` (torch.distributed initialised before `train` is called) the same loop runs data-parallel:
every rank draws the same shuffled, augmented global batch and trains on its own equal slice of it through
DistributedDataParallel, which averages the gradients; only rank 0 evaluates and writes the run directory.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import NenniError
from ..metrics import accuracy
from ..nenni.layers import anneal_ratio, nenni_layers
from . import checkpoint as ckpt
from .augment import augment_batch, resolve_augment
from .config import RESUMABLE_CHANGES, TrainConfig
from .curves import plot_curves
from .methods import Method, Standard, method_record
from .params import approximator_names, param_groups, select_trainable
from .refit import calibration_batches, refit_approximators
from .schedule import lr_at

# A validator gets the model (in eval mode) after each evaluation and returns extra metrics to log,
# e.g. {"pgd_acc": 41.2}; metrics named '*_acc' are also drawn in curves.png.
Validator = Callable[[nn.Module], dict[str, float]]
EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    run_dir: Path
    epoch: int  # epochs completed in total
    step: int  # optimiser steps completed in total
    epochs_run: int  # in this call
    resumed_from: int | None  # the epoch a resumed run continued after; None for a fresh run
    best_metric: str
    best_value: float | None
    best_epoch: int | None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def best_path(self) -> Path:
        return self.run_dir / ckpt.BEST

    @property
    def last_path(self) -> Path:
        return self.run_dir / ckpt.LAST

    @property
    def seconds_per_epoch(self) -> float | None:
        """Mean training time per epoch (evaluation excluded), over every epoch of the run."""
        secs = [r["seconds"] for r in self.history if isinstance(r.get("seconds"), (int, float))]
        return sum(secs) / len(secs) if secs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "epoch": self.epoch,
            "step": self.step,
            "epochs_run": self.epochs_run,
            "resumed_from": self.resumed_from,
            "best_metric": self.best_metric,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "seconds_per_epoch": self.seconds_per_epoch,
        }


@dataclass
class _State:
    """What last.json stores besides the tensors."""

    epoch: int = 0
    step: int = 0
    best_value: float | None = None
    best_epoch: int | None = None


def split_indices(n: int, val_split: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of range(n), cut into train and validation indices (the last `val_split`)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_split))
    if val_split > 0 and n_val == 0:
        n_val = 1
    if n_val >= n:
        raise NenniError(f"--val-split {val_split} leaves no training images out of {n}")
    return perm[: n - n_val], perm[n - n_val :]


def steps_per_epoch(n_train: int, config: TrainConfig) -> int:
    """Full batches only (the order is reshuffled every epoch, so nothing is skipped for good)."""
    steps = max(1, n_train // config.batch_size)
    return min(steps, config.max_steps_per_epoch) if config.max_steps_per_epoch else steps


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    method: Method | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    validators: Sequence[Validator] = (),
    resume: bool = False,
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
    curves: bool = True,
) -> TrainResult:
    """Train `model` in place on images `x` (NCHW float in [0, 1]) and labels `y`; checkpoints go to `run_dir`.

    Validation data is `val` if given, else `config.val_split` of (x, y) held out by seed; with neither,
    `best.safetensors` follows the last epoch. `resume=True` continues from run_dir's last checkpoint (or
    starts fresh when there is none: `result.resumed_from` says which); a fresh run clears old checkpoints.
    The model is left with the weights of the last epoch; load `result.best_path` for the best ones.
    `curves=False` skips drawing curves.png (it costs about as much as a tiny test run).
    """
    if config.epochs is None:
        raise NenniError("the number of epochs is not set (TrainConfig.epochs is None)")
    method = method or Standard(label_smoothing=config.label_smoothing)
    check_model = getattr(method, "check_model", None)
    if callable(check_model):
        check_model(model)  # before the run directory is touched
    rank, world = _world()
    if config.batch_size % world:
        raise NenniError(f"--batch-size {config.batch_size} must be a multiple of the {world} processes")
    run_dir = _prepare_run_dir(Path(run_dir))
    if config.threads:
        torch.set_num_threads(config.threads)
    if len(x) != len(y) or len(x) == 0:
        raise NenniError(f"need as many labels as images (got {len(x)} images, {len(y)} labels)")
    if val is None and config.val_split > 0:
        train_idx, val_idx = split_indices(len(x), config.val_split, config.seed)
        val = (x[val_idx], y[val_idx])
    else:
        train_idx = torch.arange(len(x))
    if config.refit_every and not nenni_layers(model):
        raise NenniError("--refit-every needs a NENNI model (this one has no NENNI layers)")

    params = select_trainable(model, config.trainable, config.train_scale)
    optimizer = torch.optim.SGD(
        param_groups(model, params, config.weight_decay, config.approx_lr_scale, config.scale_lr_scale),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
    )
    generator = torch.Generator()
    state, history, resumed_from = _start(run_dir, model, optimizer, params, config, method, generator, resume, rank)
    lead = rank == 0

    spe = steps_per_epoch(len(train_idx), config)
    loop = _Loop(model, method, optimizer, params, config, x, y, train_idx, generator, spe, progress and lead)
    calib = []
    if config.refit_every:  # index first: x[train_idx] would copy the whole training set
        calib = calibration_batches(x[train_idx[: config.refit_images]], config.refit_images, config.eval_batch_size)
    track_last = val is None and config.best_metric == "val_acc"
    first_epoch = state.epoch + 1
    for epoch in range(first_epoch, config.epochs + 1):
        record = loop.run_epoch(epoch, state)
        if config.refit_every and epoch % config.refit_every == 0:
            _refit(model, calib, config.refit_ridge, optimizer, params)
            record["refit"] = True
        if lead and (epoch % config.eval_every == 0 or epoch == config.epochs):
            record.update(_evaluate(model, val, validators, config.eval_batch_size))
        history.append(record)
        if lead:
            _update_best(run_dir, model, state, record, config.best_metric, track_last)
            ckpt.append_metrics(run_dir, record)
            _save_last(run_dir, model, optimizer, params, state, generator, config, method)
            if on_epoch:
                on_epoch(record)
        if world > 1:
            dist.barrier()  # the other ranks wait while rank 0 evaluates and saves
    if history and curves and lead:
        _save_curves(run_dir, history, method.name)
    return TrainResult(
        run_dir=run_dir,
        epoch=state.epoch,
        step=state.step,
        epochs_run=max(0, config.epochs - first_epoch + 1),
        resumed_from=resumed_from,
        best_metric=config.best_metric,
        best_value=state.best_value,
        best_epoch=state.best_epoch,
        history=history,
    )


class _Loop:
    """One epoch of SGD: shuffle, augment, schedule, step. Holds what does not change between epochs."""

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        optimizer: torch.optim.Optimizer,
        params: dict[str, nn.Parameter],
        config: TrainConfig,
        x: torch.Tensor,
        y: torch.Tensor,
        train_idx: torch.Tensor,
        generator: torch.Generator,
        spe: int,
        progress: bool,
    ) -> None:
        self.model, self.method, self.optimizer, self.params = model, method, optimizer, params
        self.rank, self.world = _world()
        # DDP's constructor broadcasts rank 0's weights, so replicas start identical even if seeds differ.
        self.net = nn.parallel.DistributedDataParallel(model) if self.world > 1 else model
        self.config, self.x, self.y, self.train_idx = config, x, y, train_idx
        self.generator, self.spe, self.progress = generator, spe, progress
        self.aug = resolve_augment(config.augment, tuple(x.shape[1:]))
        self.total = config.epochs * spe
        self.warmup = int(round(config.warmup_epochs * spe))
        self.anneal = int(round(config.anneal_epochs * spe)) if nenni_layers(model) else 0
        self.device = next(iter(params.values())).device

    def run_epoch(self, epoch: int, state: _State) -> dict[str, Any]:
        from tqdm.auto import tqdm

        cfg = self.config
        _train_mode(self.model)
        perm = torch.randperm(len(self.train_idx), generator=self.generator)
        loss_sum, correct, seen, lr = 0.0, 0, 0, cfg.lr
        start = time.perf_counter()
        bar = tqdm(
            range(self.spe), desc=f"epoch {epoch}/{cfg.epochs}", unit="step", leave=False, disable=not self.progress
        )
        for i in bar:
            idx = self.train_idx[perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
            # Every rank augments the whole batch (same generator, same draws), then keeps its own slice.
            xb = augment_batch(self.x[idx], self.aug, self.generator)
            yb = self.y[idx]
            if self.world > 1:
                xb, yb = xb[self.rank :: self.world], yb[self.rank :: self.world]
            xb, yb = xb.to(self.device), yb.to(self.device)
            lr = lr_at(state.step, self.total, cfg.lr, cfg.schedule, self.warmup)
            if self.anneal:  # a function of the global step, so a resumed run anneals identically
                anneal_ratio(self.model, state.step / self.anneal)
            loss, logits = self._step(xb, yb, lr, epoch, state.step)
            state.step += 1
            loss_sum += float(loss) * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.2f}", lr=f"{lr:.2g}", refresh=False
            )
        bar.close()
        anneal_ratio(self.model, None)  # evaluation and checkpoints see the target ratios
        if self.world > 1:  # the epoch's loss and accuracy over every rank's slices
            totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
            dist.all_reduce(totals)
            loss_sum, correct, seen = float(totals[0]), int(totals[1]), int(totals[2])
            # DDP broadcasts rank 0's buffers before each forward, so the last step's batch-norm statistics
            # differ per rank until the next one: make every replica rank 0's (the one evaluated and saved).
            for buf in self.model.buffers():
                dist.broadcast(buf, 0)
        state.epoch = epoch
        return {
            "epoch": epoch,
            "epochs": cfg.epochs,
            "step": state.step,
            "lr": lr,
            "train_loss": loss_sum / seen,
            "train_acc": 100 * correct / seen,
            "val_acc": None,
            "seconds": time.perf_counter() - start,
        }

    def _step(
        self, xb: torch.Tensor, yb: torch.Tensor, lr: float, epoch: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss, logits = self.method.loss(self.net, xb, yb)
        if not torch.isfinite(loss):
            value = float(loss.detach())
            raise NenniError(f"training diverged at epoch {epoch}, step {step} (loss {value}); try a lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.config.grad_clip)
        self.optimizer.step()
        return loss.detach(), logits.detach()


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _train_mode(model: nn.Module) -> None:
    """Training mode, except batch norms whose parameters are frozen: their running stats are base weights too."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()


def _evaluate(
    model: nn.Module, val: tuple[torch.Tensor, torch.Tensor] | None, validators: Sequence[Validator], batch_size: int
) -> dict[str, Any]:
    start = time.perf_counter()
    out: dict[str, Any] = {}
    if val is not None:
        out["val_acc"] = accuracy(model, val[0], val[1], batch_size)
    for validate in validators:
        model.eval()
        out.update(validate(model))
    out["eval_seconds"] = time.perf_counter() - start
    return out


def _refit(
    model: nn.Module,
    batches: list[torch.Tensor],
    ridge: float,
    optimizer: torch.optim.Optimizer,
    params: dict[str, nn.Parameter],
) -> None:
    """Closed-form refit; the approximators' momentum belonged to the old solution, so it is dropped."""
    layers = nenni_layers(model)
    modes = {name: layer.mode for name, layer in layers.items()}
    refit_approximators(model, batches, ridge)
    for name, layer in layers.items():
        layer.mode = modes[name]
    for name in approximator_names(model) & set(params):
        optimizer.state.pop(params[name], None)


def _update_best(
    run_dir: Path, model: nn.Module, state: _State, record: dict[str, Any], metric: str, track_last: bool
) -> None:
    value = record.get(metric)
    if track_last:
        ckpt.save_model(run_dir / ckpt.BEST, model, f"epoch-{state.epoch}")
        state.best_epoch = state.epoch
        return
    if not isinstance(value, (int, float)) or math.isnan(value):
        return
    if state.best_value is None or value > state.best_value:
        state.best_value, state.best_epoch = float(value), state.epoch
        ckpt.save_model(run_dir / ckpt.BEST, model, f"epoch-{state.epoch}")


def _tag(state: _State) -> str:
    return f"epoch-{state.epoch}-step-{state.step}"


def _save_last(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: dict[str, nn.Parameter],
    state: _State,
    generator: torch.Generator,
    config: TrainConfig,
    method: Method,
) -> None:
    """Tensors first, last.json last: last.json names the epoch both tensor files must carry."""
    tag = _tag(state)
    ckpt.save_model(run_dir / ckpt.LAST, model, tag)
    ckpt.save_tensors_atomic(run_dir / ckpt.LAST_OPTIM, ckpt.optimizer_buffers(optimizer, params), {"checkpoint": tag})
    payload = {
        "tag": tag,
        "epoch": state.epoch,
        "step": state.step,
        "best_value": state.best_value,
        "best_epoch": state.best_epoch,
        "best_metric": config.best_metric,
        "torch_rng": ckpt.rng_state_list(torch.get_rng_state()),
        "data_rng": ckpt.rng_state_list(generator.get_state()),
        "config": config.to_dict(),
        "method": method_record(method),
    }
    ckpt.write_text_atomic(run_dir / ckpt.LAST_STATE, json.dumps(payload) + "\n")


def _start(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: dict[str, nn.Parameter],
    config: TrainConfig,
    method: Method,
    generator: torch.Generator,
    resume: bool,
    rank: int = 0,
) -> tuple[_State, list[dict[str, Any]], int | None]:
    saved = ckpt.read_state(run_dir) if resume else None
    if saved is None:
        if rank == 0:
            _clear_run_dir(run_dir)
        torch.manual_seed(config.seed)
        generator.manual_seed(config.seed + 1)  # its own stream: data order and augmentation
        return _State(), [], None
    _check_compatible(saved, config, method, run_dir)
    ckpt.load_model(run_dir / ckpt.LAST, model)
    ckpt.restore_optimizer(optimizer, params, ckpt.load_tensors(run_dir / ckpt.LAST_OPTIM))
    torch.set_rng_state(ckpt.rng_state_tensor(saved["torch_rng"]))
    generator.set_state(ckpt.rng_state_tensor(saved["data_rng"]))
    state = _State(saved["epoch"], saved["step"], saved.get("best_value"), saved.get("best_epoch"))
    # Epochs logged after the checkpoint (a crash between the two writes) are redone, so drop their lines.
    history = [r for r in ckpt.read_metrics(run_dir) if r.get("epoch", 0) <= state.epoch]
    if rank == 0:
        ckpt.write_metrics(run_dir, history)
    return state, history, state.epoch


def _check_compatible(saved: dict[str, Any], config: TrainConfig, method: Method, run_dir: Path) -> None:
    try:
        old = TrainConfig.from_dict(saved["config"])
    except (KeyError, TypeError) as exc:
        raise NenniError(f"{run_dir / ckpt.LAST_STATE}: malformed ({exc})") from None
    changed = [k for k in old.differences(config) if k not in RESUMABLE_CHANGES]
    if changed:
        detail = ", ".join(f"{k}: {getattr(old, k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise NenniError(f"cannot resume {run_dir}: settings differ from the checkpoint ({detail})")
    if saved.get("method") != method_record(method):
        raise NenniError(
            f"cannot resume {run_dir}: it was trained with {saved.get('method')}, not {method_record(method)}"
        )


def _prepare_run_dir(run_dir: Path) -> Path:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NenniError(f"cannot create run directory {run_dir}: {exc.strerror or exc}") from None
    return run_dir


def _clear_run_dir(run_dir: Path) -> None:
    """A fresh run must not leave an older run's checkpoints to be resumed or mistaken for its own."""
    for name in (ckpt.LAST_STATE, ckpt.LAST, ckpt.LAST_OPTIM, ckpt.BEST, ckpt.METRICS, ckpt.CURVES):
        (run_dir / name).unlink(missing_ok=True)


def _save_curves(run_dir: Path, history: list[dict[str, Any]], title: str) -> None:
    ckpt.atomic_write(run_dir / ckpt.CURVES, lambda tmp: plot_curves(history, tmp, title=f"{title} training"))

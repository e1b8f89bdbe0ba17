"""The training loop, its pieces, and the `nenni train` / `nenni finetune` commands (digits only: fast)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _cli import assert_one_line_error as _one_line_error
from _cli import invoke as _invoke
from _nets import tiny_net

from nenni_deploy.errors import NenniError
from nenni_deploy.nenni.config import NenniConfig
from nenni_deploy.nenni.convert import convert
from nenni_deploy.nenni.fit import fit
from nenni_deploy.nenni.layers import nenni_layers
from nenni_deploy.training import (
    TrainConfig,
    augment_batch,
    lr_at,
    measure_fit,
    param_groups,
    resolve_augment,
    select_trainable,
    train,
)
from nenni_deploy.training import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")


# -- schedule -----------------------------------------------------------------------------------------------
def test_cosine_schedule_values():
    total = 100
    assert lr_at(0, total, 0.1, "cosine") == pytest.approx(0.1)
    assert lr_at(50, total, 0.1, "cosine") == pytest.approx(0.05)
    assert lr_at(99, total, 0.1, "cosine") == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.99)))
    values = [lr_at(s, total, 0.1, "cosine") for s in range(total)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_piecewise_and_constant_schedules():
    total = 200
    assert lr_at(99, total, 0.1, "piecewise") == pytest.approx(0.1)
    assert lr_at(100, total, 0.1, "piecewise") == pytest.approx(0.01)
    assert lr_at(149, total, 0.1, "piecewise") == pytest.approx(0.01)
    assert lr_at(150, total, 0.1, "piecewise") == pytest.approx(0.001)
    assert lr_at(199, total, 0.1, "constant") == pytest.approx(0.1)


def test_warmup_rises_linearly_then_hands_over():
    assert [lr_at(s, 100, 0.1, "cosine", warmup_steps=4) for s in range(4)] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lr_at(4, 100, 0.1, "cosine", warmup_steps=4) == pytest.approx(0.1)


# -- augmentation -------------------------------------------------------------------------------------------
def test_augment_auto_picks_crop_flip_for_cifar_and_shift_for_digits():
    assert resolve_augment("auto", (3, 32, 32)) == "crop_flip"
    assert resolve_augment("auto", (1, 8, 8)) == "translate"
    assert resolve_augment("none", (3, 32, 32)) == "none"


@pytest.mark.parametrize("kind,shape", [("crop_flip", (16, 3, 32, 32)), ("translate", (16, 1, 8, 8))])
def test_augmentation_keeps_shape_and_range_and_is_seeded(kind, shape):
    x = torch.rand(shape)
    a = augment_batch(x, kind, torch.Generator().manual_seed(1))
    b = augment_batch(x, kind, torch.Generator().manual_seed(1))
    c = augment_batch(x, kind, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_translate_moves_each_image_by_at_most_one_pixel_and_never_flips():
    x = torch.zeros(64, 1, 8, 8)
    x[:, 0, 3, 2] = 1.0  # one bright pixel left of centre
    out = augment_batch(x, "translate", torch.Generator().manual_seed(0))
    pos = out.flatten(1).argmax(1)
    rows, cols = pos // 8, pos % 8
    assert torch.all((rows - 3).abs() <= 1) and torch.all((cols - 2).abs() <= 1)
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 3  # shifts really vary
    assert torch.allclose(out.sum((1, 2, 3)), torch.ones(64))  # a shift, no mirror to column 5


# -- config -------------------------------------------------------------------------------------------------
def test_train_config_round_trips_and_rejects_bad_values():
    cfg = TrainConfig(epochs=3, lr=0.05, schedule="piecewise", max_steps_per_epoch=7, trainable="base")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in ({"epochs": 0}, {"lr": 0}, {"val_split": 1.0}, {"schedule": "step"}, {"nesterov": True, "momentum": 0}):
        with pytest.raises(NenniError):
            TrainConfig(**bad)
    with pytest.raises(NenniError, match="unknown"):
        TrainConfig.from_dict({"epoch": 1})


# -- parameters ---------------------------------------------------------------------------------------------
def _nenni_tiny(noise: str = "none"):
    net = tiny_net()
    convert(net, NenniConfig(granularity="channel", ratio=0.5, proj_dim="n/2", noise=noise))
    fit(net, [torch.rand(32, 3, 8, 8)], progress=False)
    return net


def test_trainable_selectors_pick_the_right_parameters():
    net = _nenni_tiny()
    layers = nenni_layers(net)
    approx = {f"{n}.{p}" for n in layers for p in ("approx_weight", "approx_bias")}
    scales = {n for n, _ in net.named_parameters() if n.endswith(".scale")}
    assert "block.conv1.exact.scale" in scales
    everything = {n for n, _ in net.named_parameters()} - scales
    assert set(select_trainable(net, "approx")) == approx
    base = set(select_trainable(net, "base"))
    assert base == everything - approx
    assert {"conv1.weight", "linear.weight", "block.conv1.exact.weight", "block.conv1.exact.bias"} <= base
    assert not any(p.requires_grad for n, p in net.named_parameters() if n in approx | scales)
    assert set(select_trainable(net, "both")) == everything
    assert set(select_trainable(net, "both", train_scale=True)) == everything | scales
    assert set(select_trainable(net, "approx", train_scale=True)) == approx
    buffers = {n for n, _ in net.named_buffers()}
    assert "block.conv1.proj" in buffers and not buffers & everything


def test_weight_decay_only_on_conv_and_linear_weights():
    net = _nenni_tiny()
    params = select_trainable(net, "both")
    groups = {g["group"]: g for g in param_groups(net, params, 5e-4)}
    decayed = {n for n, p in params.items() if any(p is q for q in groups["decay"]["params"])}
    assert "block.conv1.exact.weight" in decayed and "linear.weight" in decayed
    assert not any(n.endswith(("bias", "approx_weight")) for n in decayed)
    assert groups["no_decay"]["weight_decay"] == 0


def test_approx_selector_needs_a_nenni_model():
    with pytest.raises(NenniError, match="no approximator"):
        select_trainable(tiny_net(), "approx")


# -- the loop -----------------------------------------------------------------------------------------------
class _Crash(Exception):
    pass


def _toy_data(n: int = 96):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("kind", ["plain", "nenni_gaussian"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, kind):
    """Batch norm statistics, momentum, LR position, data order, augmentation and noise RNG all carry over."""
    x, y = _toy_data()
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, nesterov=True, max_steps_per_epoch=3, val_split=0.25)

    def model():
        net = tiny_net() if kind == "plain" else _nenni_tiny("gaussian")
        return net.train()

    full = model()
    train(full, x, y, cfg, tmp_path / "full", progress=False, curves=False)

    def crash_after_first(record):
        if record["epoch"] == 1:
            raise _Crash

    part = model()
    with pytest.raises(_Crash):
        train(part, x, y, cfg, tmp_path / "part", progress=False, curves=False, on_epoch=crash_after_first)
    resumed = model()  # a new process would start from fresh weights
    result = train(resumed, x, y, cfg, tmp_path / "part", resume=True, progress=False, curves=False)
    assert result.resumed_from == 1 and result.epoch == 3 and result.epochs_run == 2
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    drop = ("seconds", "eval_seconds")
    logs = [
        [{k: v for k, v in r.items() if k not in drop} for r in ckpt.read_metrics(tmp_path / d)]
        for d in ("full", "part")
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 3


def test_run_directory_contents_and_best_checkpoint(tmp_path):
    x, y = _toy_data()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, val_split=0.25)
    result = train(tiny_net().train(), x, y, cfg, tmp_path, progress=False, validators=[lambda m: {"extra_acc": 1.0}])
    for name in (ckpt.LAST, ckpt.LAST_OPTIM, ckpt.LAST_STATE, ckpt.BEST, ckpt.METRICS, ckpt.CURVES):
        assert (tmp_path / name).is_file(), name
    records = ckpt.read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"epoch", "step", "lr", "train_loss", "train_acc", "val_acc", "seconds", "extra_acc"} <= set(records[0])
    state = json.loads((tmp_path / ckpt.LAST_STATE).read_text())
    assert state["epoch"] == 2 and TrainConfig.from_dict(state["config"]) == cfg
    assert isinstance(state["torch_rng"], list) and isinstance(state["data_rng"], list)
    assert result.best_value == max(r["val_acc"] for r in records)
    optim = ckpt.load_tensors(tmp_path / ckpt.LAST_OPTIM)
    assert "conv1.weight" in optim  # momentum buffers by parameter name


def test_resume_refuses_changed_settings(tmp_path):
    x, y = _toy_data()
    train(tiny_net().train(), x, y, TrainConfig(epochs=1, batch_size=32, lr=0.05), tmp_path, progress=False)
    with pytest.raises(NenniError, match="lr"):
        train(tiny_net(), x, y, TrainConfig(epochs=2, batch_size=32, lr=0.1), tmp_path, resume=True, progress=False)


def test_refit_restores_the_fit_and_measure_fit_tracks_the_weights(tmp_path):
    x, y = _toy_data()
    net = _nenni_tiny()
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, trainable="base", refit_every=1, refit_images=64)
    train(net, x, y, cfg, tmp_path, progress=False)
    layer = next(iter(nenni_layers(net).values()))
    assert layer.mode == "nenni"
    stats = measure_fit(net, [x[:64]])
    # measure_fit on the data the refit used reproduces the refit's own statistics (same inputs, same W~)
    assert stats[layer.spec.name]["residual_rms"] == pytest.approx(float(layer.residual_rms), rel=1e-6)
    assert stats[layer.spec.name]["fit_rel_error"] < 1.0


# -- command line -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("train") / "run"
    summary = run.parent / "summary.json"
    result = _invoke(
        "train",
        "--arch",
        "small_cnn",
        "--data",
        "digits",
        "--epochs",
        2,
        "--batch-size",
        32,
        "--lr",
        0.1,
        "--out",
        run,
        "--json",
        summary,
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    return run, json.loads(summary.read_text())


def test_train_command_end_to_end_on_digits(trained_digits):
    from nenni_deploy.data import load_dataset
    from nenni_deploy.metrics import accuracy
    from nenni_deploy.models import create_model

    run, summary = trained_digits
    assert {"arch", "method", "epochs", "test_accuracy", "best_val_accuracy", "seconds_per_epoch"} <= set(summary)
    assert summary["arch"] == "small_cnn" and summary["method"] == "standard" and summary["epochs"] == 2
    assert summary["test_accuracy"] > 80
    for name in (
        "weights.safetensors",
        ckpt.LAST,
        ckpt.LAST_OPTIM,
        ckpt.LAST_STATE,
        ckpt.BEST,
        ckpt.METRICS,
        ckpt.CURVES,
    ):
        assert (run / name).is_file(), name
    model = create_model("small_cnn", weights=run / "weights.safetensors")
    test = load_dataset("digits", "test")
    assert accuracy(model, test.x, test.y) == pytest.approx(summary["test_accuracy"])


def test_finetune_command_on_a_digits_nenni_model(trained_digits, tmp_path):
    from nenni_deploy.data import load_dataset
    from nenni_deploy.models import create_model
    from nenni_deploy.nenni.io import load_model_dir, save_model_dir

    run, _ = trained_digits
    model = create_model("small_cnn", weights=run / "weights.safetensors")
    config = NenniConfig(granularity="channel", ratio=0.5, proj_dim="n/2")
    specs = convert(model, config)
    fit(model, [load_dataset("digits", "train").x[:512]], progress=False)
    src = save_model_dir(
        tmp_path / "nenni", model, source="small_cnn", config=config, specs=specs, history=[{"stage": "calibrate"}]
    )
    out, summary = tmp_path / "tuned", tmp_path / "ft.json"
    result = _invoke(
        "finetune", src, "--epochs", 1, "--batch-size", 32, "--out", out, "--json", summary, "--no-progress"
    )
    assert result.exit_code == 0, result.output
    s = json.loads(summary.read_text())
    assert {"nenni_accuracy_before", "nenni_accuracy_after", "exact_accuracy_after", "seconds_per_epoch"} <= set(s)
    assert s["nenni_accuracy_after"] > max(30.0, s["nenni_accuracy_before"] - 5)  # no collapse
    tuned, card = load_model_dir(out)
    assert [h["stage"] for h in card["history"]] == ["calibrate", "finetune"]
    assert card["metrics"]["nenni_accuracy"] == pytest.approx(s["nenni_accuracy_after"])
    assert (out / "train" / ckpt.LAST_STATE).is_file() and len(nenni_layers(tuned)) == len(specs)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _one_line_error(_invoke("finetune", src, "--out", blocker / "tuned"))
    _one_line_error(_invoke("finetune", src, "--epochs", 0, "--out", tmp_path / "x"))
    # the checkpoints survive the model directory being rewritten: a resume continues to epoch 2
    result = _invoke("finetune", src, "--epochs", 2, "--batch-size", 32, "--out", out, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "resumed after epoch 1" in result.output
    _, card = load_model_dir(out)
    assert card["history"][-1]["epochs"] == 2 and len(ckpt.read_metrics(out / "train")) == 2


def test_bad_inputs_are_one_line_errors(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    _one_line_error(_invoke("finetune", tmp_path / "missing", "--out", tmp_path / "o"))
    _one_line_error(_invoke("train", "--arch", "small_cnn", "--epochs", 0, "--out", tmp_path / "r"))
    _one_line_error(_invoke("train", "--arch", "small_cnn", "--epochs", 1, "--out", blocker / "run"))
    _one_line_error(_invoke("train", "--arch", "no_such_net", "--out", tmp_path / "r"))

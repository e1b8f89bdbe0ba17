"""Adversarial training methods (PGD-AT, fast AT, TRADES, MART, SLIM) in the one loop, and their commands."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _cli import assert_one_line_error as _one_line_error
from _cli import invoke as _invoke
from _nets import tiny_net

from nenni_deploy.attacks import PGD
from nenni_deploy.errors import NenniError
from nenni_deploy.nenni.config import NenniConfig
from nenni_deploy.nenni.convert import convert
from nenni_deploy.nenni.fit import fit
from nenni_deploy.nenni.layers import nenni_layers
from nenni_deploy.training import Adversarial, TrainConfig, fast_at, make_method, pgd_validator, train
from nenni_deploy.training import checkpoint as ckpt
from nenni_deploy.training.methods import mart_loss, resolve_slim_layers, trades_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy_data(n: int = 96):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _nenni_tiny():
    net = tiny_net()
    convert(net, NenniConfig(granularity="channel", ratio=0.5, proj_dim="n/2"))
    fit(net, [torch.rand(32, 3, 8, 8)], progress=False)
    return net


ALL_METHODS = [
    make_method("pgd", steps=3),
    fast_at(8 / 255),
    make_method("trades", steps=3),
    make_method("mart", steps=3),
    make_method("pgd", steps=2, slim_layers=["block", "down"]),
    make_method("trades", steps=2, slim_layers=["block"]),
]


# -- the attack inside a training step ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m.name + ("+slim" if m.slim else ""))
def test_attack_stays_in_budget_and_leaves_the_model_as_it_found_it(method):
    net = tiny_net().train()
    net.bn_down.eval()  # a frozen batch norm (as in NENNI fine-tuning) must stay in eval mode afterwards
    x, y = _toy_data(16)
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    x_adv, _ = method.perturb(net, x, y)
    assert (x_adv - x).abs().max() <= method.eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)
    for k, v in net.state_dict().items():  # batch norm ran in eval mode: running stats untouched
        assert torch.equal(v, stats[k]), k
    assert net.training and net.block.bn1.training and not net.bn_down.training
    assert all(p.grad is None for p in net.parameters())


def test_each_batch_draws_a_fresh_random_start():
    """PGD seeds its own generator; training draws the seed per batch, else every batch gets the same start."""
    net = tiny_net()
    x, y = _toy_data(8)
    method = fast_at(8 / 255)
    torch.manual_seed(0)
    a, _ = method.perturb(net, x, y)
    b, _ = method.perturb(net, x, y)
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    again, _ = method.perturb(net, x, y)
    assert torch.equal(a, again)


def test_slim_redraws_layer_and_lambda_per_batch_and_changes_the_attack():
    net = tiny_net()
    x, y = _toy_data(16)
    slim = make_method("pgd", steps=3, slim_layers=["block", "down", "fc1"])
    plain = make_method("pgd", steps=3)
    draws = []
    for seed in range(12):
        torch.manual_seed(seed)
        adv_slim, info = slim.perturb(net, x, y)
        draws.append(info)
        torch.manual_seed(seed)
        adv_plain, none = plain.perturb(net, x, y)
        assert none == {}
        # same random start (the seed is drawn first), different objective
        assert not torch.equal(adv_slim, adv_plain)
    assert {d["layer"] for d in draws} == {"block", "down", "fc1"}
    lambdas = [d["lambda"] for d in draws]
    assert all(-1 <= v <= 1 for v in lambdas) and min(lambdas) < 0 < max(lambdas)


def test_slim_layer_patterns_resolve_against_the_model():
    net = tiny_net()
    # No sequential stages: each resolution's last feature map (the residual block, the strided conv's norm).
    assert resolve_slim_layers(net, ["auto"], (3, 12, 12)) == ["block", "bn_down"]
    assert resolve_slim_layers(net, ["block.conv*"]) == ["block.conv1", "block.conv2"]
    with pytest.raises(NenniError, match="no layer matches"):
        resolve_slim_layers(net, ["nope*"])


def test_trades_and_mart_losses_reduce_to_their_clean_parts():
    g = torch.Generator().manual_seed(0)
    clean, y = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    adv = clean + torch.randn(8, 10, generator=g)
    ce = F.cross_entropy(clean, y)
    assert trades_loss(clean, clean, y, 6.0) == pytest.approx(float(ce), abs=1e-6)
    assert trades_loss(clean, adv, y, 6.0) > trades_loss(clean, adv, y, 1.0) > ce
    # MART's robust term is a KL, weighted by 1 - p_y(x): zero for identical outputs, positive otherwise
    assert mart_loss(clean, clean, y, 6.0) == pytest.approx(float(mart_loss(clean, clean, y, 0.0)), abs=1e-5)
    assert mart_loss(clean, adv, y, 6.0) > mart_loss(clean, adv, y, 0.0) > F.cross_entropy(adv, y)


def test_bad_method_settings_are_nenni_errors():
    for kwargs in ({"eps": 0}, {"eps": 2.0}, {"eps": float("nan")}, {"steps": 0}, {"alpha": -1.0}, {"via": "x"}):
        with pytest.raises(NenniError):
            Adversarial(**kwargs)
    with pytest.raises(NenniError, match="unknown method"):
        make_method("fgsm")
    with pytest.raises(NenniError, match="adversarial"):
        make_method("standard", slim_layers=["block"])
    with pytest.raises(NenniError, match="one attack step"):
        make_method("fast", steps=5)


# -- in the loop --------------------------------------------------------------------------------------------
class _Crash(Exception):
    pass


@pytest.mark.parametrize("method", [ALL_METHODS[1], ALL_METHODS[5]], ids=["fast", "trades+slim"])
def test_adversarial_resume_matches_an_uninterrupted_run(tmp_path, method):
    """The per-batch attack seeds, SLIM layers and lambdas come from the RNG the checkpoints restore."""
    x, y = _toy_data()
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, max_steps_per_epoch=2, val_split=0.25)
    full = tiny_net().train()
    train(full, x, y, cfg, tmp_path / "full", method=method, progress=False, curves=False)

    def crash(record):
        raise _Crash

    with pytest.raises(_Crash):
        train(tiny_net().train(), x, y, cfg, tmp_path / "part", method=method, progress=False, on_epoch=crash)
    resumed = tiny_net().train()
    train(resumed, x, y, cfg, tmp_path / "part", method=method, resume=True, progress=False, curves=False)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    saved = json.loads((tmp_path / "part" / ckpt.LAST_STATE).read_text())["method"]
    assert saved["name"] == method.name and saved["eps"] == method.eps


def test_resume_refuses_another_method_or_attack(tmp_path):
    x, y = _toy_data()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, max_steps_per_epoch=1)
    with pytest.raises(_Crash):
        train(tiny_net().train(), x, y, cfg, tmp_path, method=fast_at(8 / 255), progress=False, on_epoch=_raise)
    for other in (make_method("pgd", steps=2), fast_at(4 / 255), fast_at(8 / 255, slim_layers=("block",))):
        with pytest.raises(NenniError, match="cannot resume"):
            train(tiny_net(), x, y, cfg, tmp_path, method=other, resume=True, progress=False)


def _raise(_record):
    raise _Crash


def test_pgd_validator_selects_the_best_checkpoint(tmp_path):
    x, y = _toy_data()
    net = tiny_net().train()
    attack = PGD(eps=8 / 255, steps=3, alpha=4 / 255)
    val_x, val_y = x[:32], y[:32]
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, max_steps_per_epoch=2, best_metric="pgd_acc")
    validator = pgd_validator(val_x, val_y, attack, batch_size=16)
    result = train(net, x[32:], y[32:], cfg, tmp_path, method=fast_at(8 / 255), val=(val_x, val_y),
                   validators=[validator], progress=False, curves=False)  # fmt: skip
    records = ckpt.read_metrics(tmp_path)
    assert all(0 <= r["pgd_acc"] <= r["val_acc"] for r in records)
    assert result.best_value == max(r["pgd_acc"] for r in records)
    best = tiny_net()
    ckpt.load_model(tmp_path / ckpt.BEST, best)
    assert validator(best)["pgd_acc"] == result.best_value  # the fixed attack seed makes it reproducible
    # eps -> 0: PGD accuracy is clean accuracy
    tiny = pgd_validator(val_x, val_y, PGD(eps=1e-9, steps=1), name="x_acc")(best)["x_acc"]
    assert tiny == pytest.approx(records[result.best_epoch - 1]["val_acc"])


def test_attack_via_bpda_needs_a_nenni_model_and_is_checked_before_the_run_starts(tmp_path):
    x, y = _toy_data()
    (tmp_path / "keep.txt").write_text("x")
    method = make_method("fast", via="exact")
    with pytest.raises(NenniError, match="NENNI model"):
        train(tiny_net().train(), x, y, TrainConfig(epochs=1, batch_size=32), tmp_path, method=method)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_bpda_attack_differs_from_the_nenni_forward_attack_and_restores_the_layers():
    net = _nenni_tiny()
    x, y = _toy_data(16)
    advs = {}
    for via in ("nenni", "exact", "approx"):
        torch.manual_seed(0)
        advs[via], _ = make_method("pgd", steps=3, via=via).perturb(net, x, y)
        assert all(layer.gradient == "true" for layer in nenni_layers(net).values())
    assert not torch.equal(advs["nenni"], advs["exact"]) and not torch.equal(advs["exact"], advs["approx"])


def test_fast_at_buys_robustness_on_digits(tmp_path):
    """The point of the methods: on digits, fast AT at eps 0.1 gains PGD accuracy over standard training."""
    from nenni_deploy.data import load_dataset
    from nenni_deploy.models import create_model

    data, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    attack = PGD(eps=0.1, steps=10, alpha=0.025)
    cfg = TrainConfig(epochs=4, batch_size=32, lr=0.05, val_split=0.0)
    robust = {}
    for name, method in (("standard", None), ("fast", fast_at(0.1))):
        torch.manual_seed(0)
        model = create_model("small_cnn")
        train(model, data.x, data.y, cfg, tmp_path / name, method=method, progress=False, curves=False)
        robust[name] = pgd_validator(test.x, test.y, attack)(model)["pgd_acc"]
    assert robust["fast"] > robust["standard"] + 10, robust


# -- commands -----------------------------------------------------------------------------------------------


DIGITS = ("--arch", "small_cnn", "--data", "digits", "--batch-size", 32, "--no-progress")


def test_train_command_with_fast_at_and_slim(tmp_path):
    out, summary = tmp_path / "run", tmp_path / "s.json"
    result = _invoke("train", *DIGITS, "--epochs", 2, "--method", "fast", "--eps", "16/255", "--slim",
                     "--val-pgd-n", 64, "--val-pgd-steps", 3, "--out", out, "--json", summary)  # fmt: skip
    assert result.exit_code == 0, result.output
    s = json.loads(summary.read_text())
    assert s["method"] == "fast" and s["best_metric"] == "pgd_acc"
    assert s["method_settings"]["eps"] == pytest.approx(16 / 255) and s["method_settings"]["slim_layers"]
    assert all(isinstance(r["pgd_acc"], float) for r in s["history"])
    assert s["best_value"] == max(r["pgd_acc"] for r in s["history"])
    assert "pgd_acc" in result.output and (out / "weights.safetensors").is_file()


def test_finetune_command_adversarial_through_nenni_and_bpda(tmp_path):
    model = tmp_path / "base"
    assert _invoke("train", *DIGITS, "--epochs", 1, "--out", model).exit_code == 0
    cal = tmp_path / "cal"
    result = _invoke("calibrate", "--arch", "small_cnn", "--weights", model / "weights.safetensors", "--data", "digits",
                     "--ratio", 0.5, "--granularity", "channel", "--proj-dim", "n/2", "--out", cal)  # fmt: skip
    assert result.exit_code == 0, result.output
    for via in ("nenni", "exact"):
        out, summary = tmp_path / f"ft-{via}", tmp_path / f"ft-{via}.json"
        result = _invoke("finetune", cal, "--data", "digits", "--epochs", 1, "--batch-size", 32, "--method", "pgd",
                         "--attack-steps", 2, "--eps", "0.1", "--attack-via", via, "--val-pgd-n", 32,
                         "--val-pgd-steps", 2, "--max-steps-per-epoch", 5, "--no-progress", "--out", out,
                         "--json", summary)  # fmt: skip
        assert result.exit_code == 0, result.output
        s = json.loads(summary.read_text())
        assert s["method_settings"]["via"] == via and s["best_metric"] == "pgd_acc"
        assert isinstance(s["history"][0]["pgd_acc"], float)
        assert (out / "config.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--method", "pgd", "--eps", "2"), "eps"),
        (("--method", "pgd", "--eps", "eight"), "eps"),
        (("--method", "pgd", "--eps", "8/0"), "eps"),
        (("--method", "standard", "--slim"), "adversarial"),
        (("--method", "fast", "--slim", "--slim-layers", "nothing*"), "no layer matches"),
        (("--method", "fast", "--attack-via", "exact"), "NENNI model"),
        (("--method", "pgd", "--val-split", "0"), "validation split"),
        (("--method", "pgd", "--attack-steps", "0"), "steps"),
        (("--method", "trades", "--label-smoothing", "0.1"), "label-smoothing"),
    ],
)
def test_bad_method_options_are_one_line_errors_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    result = _invoke("train", *DIGITS, "--epochs", 1, *args, "--out", out)
    _one_line_error(result)
    assert message in result.output
    assert not out.exists() or not any(out.iterdir())

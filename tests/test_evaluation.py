"""`nenni eval` on digits: the suite per target kind, worst case, caching, ONNX replay, sanity checks, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from nenni_deploy.attacks.budget import parse_eps, parse_eps_list
from nenni_deploy.cli import main
from nenni_deploy.data import load_dataset
from nenni_deploy.errors import NenniError
from nenni_deploy.evaluation.run import Cache, Evaluation, RowResult, check_budget, sanity_warnings, worst_case
from nenni_deploy.evaluation.suite import Settings, parse_attacks, plan
from nenni_deploy.evaluation.targets import load_surrogates, load_target
from nenni_deploy.models import create_model, save_state_dict

FAST = ["--steps", "3", "--transfer-steps", "3", "--eot-samples", "2", "--aa-version", "custom"]
FAST += ["--aa-attacks", "apgd-ce", "--aa-iters", "5", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A small_cnn trained on digits for a few seconds, its NENNI model (deterministic and noisy) and ONNX export."""
    root = tmp_path_factory.mktemp("eval")
    train = load_dataset("digits", "train")
    torch.manual_seed(0)
    net = create_model("small_cnn").train()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(3):
        for i in range(0, len(train.x), 128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(train.x[i : i + 128]), train.y[i : i + 128]).backward()
            opt.step()
    weights = root / "w.safetensors"
    save_state_dict(net.eval(), weights)
    out = {"weights": weights}
    for name, extra in (("nenni", []), ("noisy", ["--noise", "gaussian"])):
        args = ["calibrate", "--arch", "small_cnn", "--weights", str(weights), "--data", "digits", "--ratio", "0.5"]
        args += ["--granularity", "element", "--proj-dim", "n/2", "--calib-n", "256", "--eval-n", "64"]
        result = CliRunner().invoke(main, [*args, *extra, "--threads", "1", "--out", str(root / name)])
        assert result.exit_code == 0, result.output
        out[name] = root / name
    onnx = root / "nenni.onnx"
    result = CliRunner().invoke(main, ["export", str(out["nenni"]), "--out", str(onnx), "--check-n", "32"])
    assert result.exit_code == 0, result.output
    out["onnx"] = onnx
    return out


def run_eval(*args):
    return CliRunner().invoke(main, ["eval", *args])


# -- budgets --------------------------------------------------------------------------------------------------
def test_eps_parses_fractions_and_decimals_in_order():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert [label for label, _ in parse_eps_list("4/255, 0.001,2/255")] == ["0.001", "2/255", "4/255"]


@pytest.mark.parametrize("bad", ["-1", "2/0", "abc", "0", "1.5", "nan", "inf", "1/255,1/255", ""])
def test_eps_out_of_range_or_malformed_is_refused(bad):
    with pytest.raises(NenniError):
        parse_eps_list(bad)


# -- which attacks apply --------------------------------------------------------------------------------------
def test_suite_per_target_kind_with_reasons_for_what_it_skips(models):
    settings = Settings(steps=2)
    dense = load_target("small_cnn", weights=models["weights"])
    rows, skipped = plan(dense, None, settings, [], (1, 8, 8))
    assert {r.name for r in rows} >= {"pgd-ce", "pgd-margin", "autoattack-standard"}
    assert set(skipped) == {"bpda", "eot", "transfer"} and all(skipped.values())

    nenni = load_target(models["nenni"])
    rows, skipped = plan(nenni, None, settings, load_surrogates(["base"], nenni), (1, 8, 8))
    names = {r.name for r in rows}
    assert {"bpda-exact", "bpda-approx", "autoattack-standard", "transfer-pgd:base", "transfer-mi-di:base"} <= names
    assert set(skipped) == {"eot"}

    noisy = load_target(models["noisy"])
    rows, skipped = plan(noisy, None, settings, [], (1, 8, 8))
    names = {r.name for r in rows}
    assert {"eot-20", "bpda-exact+eot", "autoattack-rand"} <= names and "autoattack-standard" not in names
    assert all(r.config.get("eot", 20) == 20 for r in rows if r.family in ("adaptive", "feature"))
    with pytest.raises(NenniError, match="unknown attack"):
        parse_attacks("pgd,fgsm")


# -- the command end to end -----------------------------------------------------------------------------------
def test_eval_json_worst_case_plot_and_resume(models, tmp_path):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    args = [str(models["nenni"]), "--n", "60", "--eps", "0.05,0.2", *FAST, "--chunk", "30"]
    result = run_eval(*args, "--json", str(js), "--plot", str(png))
    assert result.exit_code == 0, result.output
    report = json.loads(js.read_text())
    assert png.stat().st_size > 1000
    assert 0 < report["clean_accuracy"] <= 100
    assert len(report["key"]) == 64
    assert report["eps"] == ["0.05", "0.2"]
    for label in report["eps"]:
        accs = {name: a["accuracy"][label] for name, a in report["attacks"].items()}
        assert report["worst_case"][label] == min(accs.values())
        assert accs[report["worst_case_attack"][label]] == report["worst_case"][label]
        assert report["worst_case_per_image"][label] <= report["worst_case"][label]
        assert all(a <= report["clean_accuracy"] for a in accs.values())
        # per-image survivors: each attack's accuracy is its survivor count, and surviving every attack is their
        # intersection
        survivors = [set(a["robust_indices"][label]) for a in report["attacks"].values()]
        for a in report["attacks"].values():
            assert len(a["robust_indices"][label]) / 60 * 100 == pytest.approx(a["accuracy"][label])
        every = report["worst_case_detail"][label]["robust_indices"]
        assert set(every) == set.intersection(*survivors)
        assert len(every) / 60 * 100 == pytest.approx(report["worst_case_per_image"][label])
    assert report["worst_case"]["0.2"] <= report["worst_case"]["0.05"]
    assert "worst case" in result.output and "bpda-exact" in result.output
    # A rerun with the same arguments reads every chunk from the cache: same numbers, nothing recomputed.
    cache = sorted(p.name for p in (tmp_path / "r.json.cache").iterdir())
    again = run_eval(*args, "--json", str(js))
    assert again.exit_code == 0, again.output
    rerun = json.loads(js.read_text())
    assert rerun["attacks"] == report["attacks"] and rerun["key"] == report["key"]
    assert sorted(p.name for p in (tmp_path / "r.json.cache").iterdir()) == cache


def test_pgd_reaches_zero_on_the_undefended_model_at_a_large_eps(models, tmp_path):
    js = tmp_path / "d.json"
    result = run_eval(
        "small_cnn", "--weights", str(models["weights"]), "--n", "50", "--eps", "0.5", "--attack", "pgd",
        "--steps", "20", "--threads", "1", "--no-progress", "--json", str(js),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(js.read_text())
    assert report["clean_accuracy"] > 80
    assert report["attacks"]["pgd-ce"]["accuracy"]["0.5"] == 0.0
    assert report["sanity"]["large_eps"]["accuracy"] == 0.0


def test_onnx_target_replays_the_exact_adversarial_images(models):
    target = load_target(models["onnx"], source=models["nenni"])
    assert target.kind == "onnx" and target.nenni and target.source.nenni
    ds = load_dataset("digits", "test")
    x, y = ds.x[:40], ds.y[:40]
    settings = Settings(steps=3, transfer_steps=3)
    rows, _ = plan(target, ["transfer", "pgd"], settings, load_surrogates(["base"], target))
    ev = Evaluation(target, x, y, settings, chunk=40, progress=False)
    try:
        for row in rows:
            entry = ev._chunk(row, 0.1, 0)
            adv, _ = row.craft(x, y, 0.1)  # deterministic under the seed: the same images again
            ort = target.logits(adv)
            torch_out = target.source.module(adv).detach().numpy()
            np.testing.assert_allclose(ort, torch_out, atol=1e-4)
            assert entry["correct"] == (ort.argmax(1) == y.numpy()).tolist()
            assert all(entry["agree"])
    finally:
        target.close()


def test_onnx_source_must_be_the_exported_model(models, tmp_path):
    with pytest.raises(NenniError, match="not the model"):
        load_target(models["onnx"], source=models["noisy"])


# -- sanity checks --------------------------------------------------------------------------------------------
def _row(name, family, accs, eot=1):
    r = RowResult(name, family, {"eot": eot}, accuracy=accs)
    r.correct = {k: [True] * int(v) + [False] * (100 - int(v)) for k, v in accs.items()}
    return r


def test_sanity_checks_flag_masking_rising_accuracy_and_randomness_without_eot(models):
    target = load_target(models["nenni"])
    results = [
        _row("pgd-ce", "white-box", {"a": 40.0, "b": 45.0}),
        _row("transfer-pgd:base", "transfer", {"a": 30.0, "b": 20.0}),
        _row("bpda-exact", "adaptive", {"a": 10.0, "b": 5.0}),
    ]
    worst = worst_case(results, ["a", "b"])
    assert worst["a"]["attack"] == "bpda-exact" and worst["b"]["accuracy"] == 5.0
    quiet = {"max_abs_logit_diff": 0.0, "prediction_flips": 0.0}
    text = " | ".join(
        sanity_warnings(results, ["a", "b"], worst, quiet, target, {"accuracy": 12.0, "attack": "x", "images": 9})
    )
    assert "rises from 40.0 % at eps a to 45.0 %" in text
    assert "masks the true gradient" in text
    assert "must fall to 0" in text
    assert "transfer attack" not in text  # BPDA (white-box family) is still stronger than transfer
    results[2] = _row("bpda-exact", "adaptive", {"a": 35.0, "b": 30.0})
    worst = worst_case(results, ["a", "b"])
    noisy = {"max_abs_logit_diff": 0.3, "prediction_flips": 2.0}
    text = " | ".join(sanity_warnings(results, ["a", "b"], worst, noisy, target, None))
    assert "beats every white-box attack" in text and "no attack used EOT" in text
    assert "expected to be deterministic" in text
    results = [_row("eot-20", "adaptive", {"a": 10.0, "b": 5.0}, eot=20)]
    clean_text = sanity_warnings(results, ["a", "b"], worst_case(results, ["a", "b"]), quiet, target, None)
    assert clean_text == []


def test_cache_ignores_a_truncated_entry(tmp_path):
    cache = Cache(tmp_path)
    (tmp_path / "k.json").write_text('{"correct": [tr')
    assert cache.get("k") is None
    cache.put("k", {"correct": [True]})
    assert cache.get("k") == {"correct": [True]}


# -- bad input: one line, exit 1, nothing written ---------------------------------------------------------------
def test_bad_input_is_one_line_and_writes_nothing(models, tmp_path):
    js = tmp_path / "out.json"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x01not an onnx model at all")
    cases = {
        "missing": [str(tmp_path / "nope.onnx")],
        "missing dir": [str(tmp_path / "nope")],
        "corrupt": [str(garbage), "--source", str(models["nenni"])],
        "eps -1": [str(models["nenni"]), "--eps", "-1"],
        "eps 2/0": [str(models["nenni"]), "--eps", "2/0"],
        "unknown attack": [str(models["nenni"]), "--attack", "pgd,deepfool"],
        "onnx without surrogate, white-box": [str(models["onnx"]), "--attack", "pgd"],
        "wrong source": [str(models["onnx"]), "--source", str(models["noisy"])],
        "no weights": ["small_cnn"],
        "wrong data": [str(models["nenni"]), "--data", "cifar10"],
        "base of dense": ["small_cnn", "--weights", str(models["weights"]), "--surrogate", "base"],
    }
    for name, args in cases.items():
        result = CliRunner().invoke(main, ["eval", *args, "--json", str(js), "--no-progress"])
        assert result.exit_code != 0, name
        assert "Traceback" not in result.output, name
        message = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
        assert len(message) == 1, (name, result.output)
        assert not js.exists(), name
    assert not list(tmp_path.glob(".out.json*"))


def test_every_attack_result_is_checked_against_its_budget():
    x = torch.rand(2, 3, 4, 4) * 0.5
    check_budget("ok", x, x + 0.1, 0.1, "linf")
    for bad in (x + 0.2, x - 1.0, x * float("nan")):
        with pytest.raises(NenniError, match="budget"):
            check_budget("bad", x, bad, 0.1, "linf")


def test_transfer_always_includes_the_dense_base_and_ensembles_several_surrogates(models, tmp_path):
    js = tmp_path / "t.json"
    other = f"{models['noisy']}:dense"
    result = run_eval(
        str(models["nenni"]), "--n", "30", "--eps", "0.1", "--attack", "transfer,pgd-cs", "--surrogate", other,
        "--transfer-methods", "pgd", "--cs-layers", "all", *FAST, "--json", str(js),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    attacks = json.loads(js.read_text())["attacks"]
    assert {"transfer-pgd:base", "transfer-pgd:noisy:dense", "transfer-pgd:ensemble"} <= set(attacks)
    assert {"pgd-cs:conv2", "pgd-cs:conv3"} <= set(attacks)
    for a in attacks.values():
        assert 0 <= a["success"]["0.1"] <= 100

"""Black-box evaluation of ONNX classifiers exported with plain torch.onnx (no project metadata): the adapter's
conventions (NCHW, NHWC, normalised or 0-255 input, probabilities, a fixed batch, labels only), Square on the
session, transfer from surrogates, --adv-from / --save-adv, and every bad input as one line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from _cli import assert_one_line_error, invoke
from torch import nn

from nenni_deploy.attacks.hopskipjump import HopSkipJump
from nenni_deploy.attacks.square import Square, eta, margin_and_loss, p_selection
from nenni_deploy.data import load_dataset
from nenni_deploy.errors import NenniError
from nenni_deploy.evaluation.api import EvalConfig, evaluate, settings_for
from nenni_deploy.evaluation.blackbox import load_blackbox_target
from nenni_deploy.models import create_model, save_state_dict
from nenni_deploy.runtime.classifier import OnnxClassifier, PixelConvention

MEAN, STD = 0.3, 0.4  # what the "normalised" graph expects, in 0-1 units
ENTRY = """
from torch import nn

def net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, {classes}))
"""


def _train(seed: int, epochs: int = 3) -> nn.Module:
    train = load_dataset("digits", "train")
    torch.manual_seed(seed)
    net = create_model("small_cnn").train()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(epochs):
        for i in range(0, len(train.x), 128):
            opt.zero_grad()
            nn.functional.cross_entropy(net(train.x[i : i + 128]), train.y[i : i + 128]).backward()
            opt.step()
    return net.eval()


class Wrapped(nn.Module):
    """The trained model behind another input or output convention."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "nhwc":
            x = x.permute(0, 3, 1, 2)
        elif self.kind == "normalised":
            x = x * STD + MEAN
        elif self.kind == "0-255":
            x = x / 255
        out = self.model(x)
        if self.kind == "probabilities":
            return out.softmax(1)
        if self.kind == "labels":
            return out.argmax(1)
        return out


def _export(module: nn.Module, path, example: torch.Tensor, *, dynamic: bool = True, names=("images", "scores")):
    axes = {names[0]: {0: "n"}, names[1]: {0: "n"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(path), input_names=[names[0]], output_names=[names[1]], dynamic_axes=axes,
            dynamo=False,
        )  # fmt: skip
    return path


# How each convention's graph is exported, and the options that describe it.
VARIANTS = {
    "nchw": ((2, 1, 8, 8), True, []),
    "nhwc": ((2, 8, 8, 1), True, []),
    "normalised": ((2, 1, 8, 8), True, ["--mean", str(MEAN), "--std", str(STD)]),
    "0-255": ((2, 1, 8, 8), True, ["--input-range", "0-255"]),
    "probabilities": ((2, 1, 8, 8), True, []),
    "fixed": ((8, 1, 8, 8), False, []),
    "labels": ((2, 1, 8, 8), True, []),
}
PIXELS = {
    "normalised": PixelConvention(mean=(MEAN,), std=(STD,)),
    "0-255": PixelConvention(input_range="0-255"),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("blackbox")
    target, other = _train(0), _train(1)
    out = {"root": root, "model": target}
    save_state_dict(other, root / "other.safetensors")
    out["other"] = root / "other.safetensors"
    for name, (shape, dynamic, _) in VARIANTS.items():
        kind = "plain" if name in ("nchw", "fixed") else name
        out[name] = _export(Wrapped(target, kind).eval(), root / f"{name}.onnx", torch.rand(shape), dynamic=dynamic)
    test = load_dataset("digits", "test")
    out["x"], out["y"] = test.x[:60], test.y[:60]
    return out


def _eval(*args):
    return invoke("eval", *args, "--data", "digits", "--threads", "1", "--no-progress")


# -- the adapter ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_convention_gives_the_pytorch_models_predictions(zoo, name):
    x = zoo["x"]
    with OnnxClassifier(zoo[name], PIXELS.get(name), batch_size=7) as clf:
        spec = clf.bind(x, num_classes=10)
        labels = clf.labels(x)
        expected = zoo["model"](x).argmax(1).numpy()
        np.testing.assert_array_equal(labels, expected)
        assert spec.layout == ("nhwc" if name == "nhwc" else "nchw")
        assert spec.batch == (8 if name == "fixed" else None)
        kind = {"probabilities": "probabilities", "labels": "labels"}.get(name, "logits")
        assert spec.output == kind
        if kind != "labels":
            scores = clf.scores(x)
            assert scores.shape == (len(x), 10) and np.isfinite(scores).all()
            logits = zoo["model"](x).detach().numpy()
            # log-probabilities differ from logits by a per-row constant: the margins are the same
            margin = np.sort(scores, 1)[:, -1] - np.sort(scores, 1)[:, -2]
            np.testing.assert_allclose(margin, np.sort(logits, 1)[:, -1] - np.sort(logits, 1)[:, -2], atol=1e-3)
        assert clf.images_run == len(x) * (2 if kind != "labels" else 1)  # padding of a fixed batch not counted


def test_a_graph_dynamic_in_every_axis_needs_the_layout_stated(zoo, tmp_path):
    path = tmp_path / "dyn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            zoo["model"], (torch.rand(2, 1, 8, 8),), str(path), input_names=["x"],
            dynamic_axes={"x": {0: "n", 1: "c", 2: "h", 3: "w"}}, dynamo=False,
        )  # fmt: skip
    with pytest.raises(NenniError, match="pass --layout nchw or nhwc"):
        with OnnxClassifier(path) as clf:
            clf.bind(zoo["x"], 10)
    with OnnxClassifier(path, PixelConvention(layout="nchw")) as clf:
        assert clf.bind(zoo["x"], 10).layout == "nchw"
        np.testing.assert_array_equal(clf.labels(zoo["x"]), zoo["model"](zoo["x"]).argmax(1).numpy())


# -- Square ---------------------------------------------------------------------------------------------------
def test_square_schedule_and_l2_pattern_follow_autoattack():
    assert [p_selection(0.8, i, 5000) for i in (0, 10, 11, 50, 51, 500, 501, 4001, 8001)] == [
        0.8, 0.8, 0.4, 0.4, 0.2, 0.1, 0.05, 0.8 / 128, 0.8 / 512,
    ]  # fmt: skip
    assert p_selection(0.8, 100, 1000, rescale=True) == p_selection(0.8, 1000, 5000)
    block = eta(5)
    assert block.norm().item() == pytest.approx(1.0)
    assert (block[:2] >= 0).all() and (block[2:] <= 0).all()
    assert block[1, 2] == block[:2].max()  # the top half peaks at its centre
    scores = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    margin, loss = margin_and_loss(scores, torch.tensor([0, 0]), "margin")
    assert margin.tolist() == [1.0, -3.0] and torch.equal(margin, loss)


@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 1.5)])
def test_square_lowers_accuracy_within_its_budget_and_query_count(zoo, norm, eps):
    x, y = zoo["x"], zoo["y"]
    with OnnxClassifier(zoo["nchw"]) as clf:
        clf.bind(x, 10)
        scores = lambda t: torch.from_numpy(clf.scores(t))  # noqa: E731
        result = Square(eps, norm=norm, queries=150, seed=1).perturb(scores, x, y)
        spent = clf.images_run
        again = Square(eps, norm=norm, queries=150, seed=1).perturb(scores, x, y)
        replayed = clf.labels(result.x_adv) == y.numpy()
    d = (result.x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all() and result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    clean = result.clean_correct.numpy()
    assert replayed.mean() < clean.mean() - 0.2  # it breaks a good share of the images
    np.testing.assert_array_equal(replayed, ~result.fooled.numpy())
    q = result.queries.numpy()
    assert q.max() <= 150 and (q[~clean] == 0).all() and (q[clean] >= 1).all()
    assert (q[clean & ~result.fooled.numpy()] == 150).all()  # survivors spent the whole budget
    assert (q[clean & result.fooled.numpy()] < 150).any()  # broken ones stopped early
    assert spent == len(x) + q.sum()  # the clean check plus every counted query, nothing else
    assert torch.equal(again.x_adv, result.x_adv)  # seeded


def test_square_refuses_bad_settings():
    for bad in (dict(eps=0.0), dict(eps=0.1, norm="l1"), dict(eps=0.1, queries=0), dict(eps=0.1, p_init=2)):
        with pytest.raises(NenniError):
            Square(**bad)


# -- the evaluation -------------------------------------------------------------------------------------------
def test_black_box_eval_of_a_plain_export_reports_queries_and_survivors(zoo, tmp_path):
    js = tmp_path / "r.json"
    result = _eval(
        zoo["nhwc"], "--n", "60", "--eps", "0.1,0.3", "--queries", "100", "--chunk", "30",
        "--surrogate", f"small_cnn={zoo['other']}", "--transfer-methods", "pgd", "--transfer-steps", "5",
        "--json", js,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(js.read_text())
    assert set(report["attacks"]) == {"transfer-pgd:small_cnn", "square"}
    assert report["target"]["classifier"]["layout"] == "nhwc"
    assert report["clean_accuracy"] > 80
    for label in ("0.1", "0.3"):
        accs = {n: a["accuracy"][label] for n, a in report["attacks"].items()}
        assert report["worst_case"][label] == min(accs.values())
        q = report["attacks"]["square"]["queries"][label]
        assert len(q["per_image"]) == 60 and max(q["per_image"]) <= 100
        assert list(q["success_by_queries"]) == ["10", "100"]
    assert report["worst_case"]["0.3"] < report["clean_accuracy"] - 30
    assert report["sanity"]["large_eps"]["attack"] == "square"
    assert report["sanity"]["large_eps"]["accuracy"] == 0.0
    assert "broke" in result.output and "queries" in result.output
    # resume: a rerun reads every chunk from the cache
    cached = sorted(p.name for p in (tmp_path / "r.json.cache").iterdir())
    again = _eval(
        zoo["nhwc"], "--n", "60", "--eps", "0.1,0.3", "--queries", "100", "--chunk", "30",
        "--surrogate", f"small_cnn={zoo['other']}", "--transfer-methods", "pgd", "--transfer-steps", "5",
        "--json", js,
    )  # fmt: skip
    assert again.exit_code == 0 and json.loads(js.read_text())["attacks"] == report["attacks"]
    assert sorted(p.name for p in (tmp_path / "r.json.cache").iterdir()) == cached


def test_api_evaluate_on_probabilities_matches_logits(zoo):
    x, y = zoo["x"][:30], zoo["y"][:30]
    reports = {}
    for name in ("nchw", "probabilities"):
        target = load_blackbox_target(zoo[name], PixelConvention())
        try:
            target.bind(x, 10)
            config = EvalConfig(eps="0.2", settings=settings_for("quick", queries=50), preset="quick", progress=False)
            reports[name] = evaluate(target, x, y, config).to_json()
        finally:
            target.close()
    a, b = reports["nchw"], reports["probabilities"]
    assert a["clean_accuracy"] == b["clean_accuracy"]
    assert a["skipped"]["transfer"].startswith("no surrogate")
    # the same search on log-probabilities as on logits: the same images broken (up to float rounding)
    qa, qb = (r["attacks"]["square"]["queries"]["0.2"]["per_image"] for r in (a, b))
    assert np.mean(np.asarray(qa) == np.asarray(qb)) > 0.9


def test_labels_only_graph_gets_transfer_and_hopskipjump_in_squares_place(zoo, tmp_path):
    js = tmp_path / "l.json"
    result = _eval(
        zoo["labels"], "--n", "30", "--eps", "0.2", "--surrogate", f"small_cnn={zoo['other']}",
        "--preset", "quick", "--queries", "300", "--json", js,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(js.read_text())
    assert list(report["attacks"]) == ["transfer-pgd:small_cnn", "hsj"]
    assert "labels only" in report["skipped"]["square"]
    hsj = report["attacks"]["hsj"]
    assert hsj["accuracy"]["0.2"] < report["clean_accuracy"] - 30
    assert max(hsj["queries"]["0.2"]["per_image"]) <= 300
    assert report["sanity"]["large_eps"]["attack"] == "hsj"


@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 1.5)])
def test_hopskipjump_needs_only_labels_and_keeps_its_budgets(zoo, norm, eps):
    x, y = zoo["x"][:40], zoo["y"][:40]
    calls = []

    def labels(t):
        calls.append(len(t))
        return zoo["model"](t).argmax(1)

    result = HopSkipJump(eps, norm=norm, queries=400, seed=2).perturb(labels, x, y)
    d = (result.x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all() and result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    replayed = labels(result.x_adv) == y
    assert torch.equal(replayed, ~result.fooled)
    assert replayed.float().mean() < result.clean_correct.float().mean() - 0.3
    assert result.queries.max() <= 400 and (result.queries[~result.clean_correct] == 0).all()
    assert sum(calls) == len(x) * 2 + result.queries.sum()  # clean check, the replay above, and the counted queries


def test_entry_point_surrogates_and_ensemble(zoo, tmp_path):
    (tmp_path / "user_net.py").write_text(ENTRY.format(classes=10))
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    save_state_dict(lin, tmp_path / "lin.safetensors")
    js = tmp_path / "e.json"
    spec = f"{tmp_path / 'user_net.py'}:net={tmp_path / 'lin.safetensors'},small_cnn={zoo['other']}"
    result = _eval(
        zoo["fixed"], "--n", "30", "--eps", "0.2", "--attack", "transfer", "--surrogate", spec,
        "--transfer-methods", "pgd,mi-di", "--transfer-steps", "3", "--json", js,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    names = set(json.loads(js.read_text())["attacks"])
    assert {"transfer-pgd:user_net:net", "transfer-mi-di:small_cnn", "transfer-pgd:ensemble"} <= names


def test_adv_from_and_save_adv_round_trip(zoo, tmp_path):
    saved, js = tmp_path / "adv.npz", tmp_path / "s.json"
    common = ["--n", "40", "--eps", "0.1,0.2", "--queries", "60", "--preset", "quick"]
    result = _eval(zoo["nchw"], *common, "--save-adv", saved, "--json", js)
    assert result.exit_code == 0, result.output
    first = json.loads(js.read_text())
    archive = np.load(saved)
    assert archive["x"].shape == (2, 40, 1, 8, 8) and archive["labels"].tolist() == ["0.1", "0.2"]
    assert archive["fooled_by"].shape == (2, 40) and set(archive["fooled_by"].ravel()) <= {"square", ""}
    # replaying the saved images alone reproduces the per-image worst case of the run that made them
    again = _eval(zoo["nchw"], *common, "--attack", "square", "--queries", "1", "--adv-from", saved, "--json", js)
    assert again.exit_code == 0, again.output
    replay = json.loads(js.read_text())["attacks"]
    assert replay["replay:adv@0.1"]["accuracy"]["0.1"] == first["worst_case_per_image"]["0.1"]
    assert replay["replay:adv@0.2"]["accuracy"]["0.2"] == first["worst_case_per_image"]["0.2"]
    assert "0.1" not in replay["replay:adv@0.2"]["accuracy"]  # a 0.2 set is no 0.1 attack
    # and on the NHWC export of the same model: the same images, the same predictions
    other = _eval(zoo["nhwc"], *common, "--attack", "square", "--queries", "1", "--adv-from", saved, "--json", js)
    assert other.exit_code == 0, other.output
    nhwc = json.loads(js.read_text())["attacks"]["replay:adv@0.2"]
    assert nhwc["accuracy"] == replay["replay:adv@0.2"]["accuracy"]
    assert nhwc["robust_indices"] == replay["replay:adv@0.2"]["robust_indices"]


def test_a_query_attack_beating_every_gradient_attack_is_flagged_as_masking():
    from types import SimpleNamespace

    from nenni_deploy.evaluation.run import RowResult, sanity_warnings, worst_case

    def row(name, family, acc):
        correct = [True] * int(acc) + [False] * (100 - int(acc))
        return RowResult(name, family, {}, accuracy={"a": acc}, correct={"a": correct})

    results = [row("pgd-ce", "white-box", 40.0), row("square", "score-based", 10.0)]
    quiet = {"max_abs_logit_diff": 0.0, "prediction_flips": 0.0}
    text = " ".join(
        sanity_warnings(results, ["a"], worst_case(results, ["a"]), quiet, SimpleNamespace(randomised=False), None)
    )
    assert "score-based attack square (10.0 %) beats every white-box attack" in text


def test_presets_set_defaults_that_options_override():
    quick = settings_for("quick")
    assert (quick.steps, quick.queries, quick.aa_attacks, quick.transfer_methods) == (
        10,
        1000,
        ["apgd-ce", "apgd-dlr"],
        ["pgd"],
    )
    assert settings_for("full") == settings_for() and settings_for("full").queries == 5000
    mixed = settings_for("quick", steps=30, aa_version="standard")
    assert mixed.steps == 30 and mixed.aa_version == "standard" and mixed.aa_attacks is None
    assert settings_for("standard", queries=7).queries == 7
    with pytest.raises(NenniError, match="unknown preset"):
        settings_for("fast")


def test_n_larger_than_the_test_set_takes_all_with_a_note(zoo, tmp_path):
    js = tmp_path / "n.json"
    result = _eval(zoo["nchw"], "--n", "5000", "--eps", "0.3", "--attack", "square", "--queries", "5", "--json", js)
    assert result.exit_code == 0, result.output
    assert "note: --n 5000: the digits test set has 450 images" in result.output
    assert "estimated time:" in result.output.split("note:")[1]  # the estimate is printed before the work
    assert json.loads(js.read_text())["data"]["images"] == 450


# -- bad input: one line, exit 1, nothing written ---------------------------------------------------------------
class TwoInputs(nn.Module):
    def forward(self, x, z):
        return x.flatten(1)[:, :10] + z


class Flat(nn.Module):
    def forward(self, x):
        return x[:, :10] * 2


class Spatial(nn.Module):
    def forward(self, x):
        return torch.cat([x] * 10, 1)  # N x 10 x 8 x 8: not one row of scores


class TwoScores(nn.Module):
    def forward(self, x):
        s = x.flatten(1)[:, :10]
        return s, s * 2


def _bad_graphs(root, zoo):
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TwoInputs(), (torch.rand(2, 1, 8, 8), torch.rand(2, 10)), str(root / "two.onnx"), dynamo=False
        )
        torch.onnx.export(TwoScores(), (torch.rand(2, 1, 8, 8),), str(root / "twoout.onnx"), dynamo=False)
    out["two inputs"] = root / "two.onnx"
    out["two outputs"] = root / "twoout.onnx"
    out["not an image"] = _export(Flat(), root / "flat.onnx", torch.rand(2, 64))
    out["not one row"] = _export(Spatial(), root / "spatial.onnx", torch.rand(2, 1, 8, 8))
    big = Wrapped(zoo["model"], "plain")
    out["fixed shape"] = _export(big, root / "big.onnx", torch.rand(4, 1, 16, 16), dynamic=False)
    five = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    out["five classes"] = _export(five, root / "five.onnx", torch.rand(2, 1, 8, 8))
    return out


def test_bad_input_is_one_line_and_writes_nothing(zoo, tmp_path):
    graphs = _bad_graphs(tmp_path, zoo)
    (tmp_path / "five_net.py").write_text(ENTRY.format(classes=5))
    save_state_dict(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), tmp_path / "five.safetensors")
    x, y = zoo["x"][:40].numpy(), zoo["y"][:40].numpy()
    files = {
        "shape": dict(x=np.zeros((40, 1, 4, 4), np.float32), y=y),
        "labels": dict(x=x, y=(y + 1) % 10),
        "few": dict(x=x[:10], y=y[:10]),
        "budget": dict(x=np.clip(x + 0.3, 0, 1), y=y, eps=np.float64(0.1)),
        "range": dict(x=x + 2, y=y),
    }
    for name, arrays in files.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
    js, adv = tmp_path / "out.json", tmp_path / "out.npz"
    nchw = zoo["nchw"]
    cases = {**{k: [v] for k, v in graphs.items()}}
    cases.update(
        {f"adv-from {k}": [nchw, "--n", "40", "--adv-from", tmp_path / f"{k}.npz", "--attack", "square"] for k in files}
    )
    five_net, five_weights = tmp_path / "five_net.py", tmp_path / "five.safetensors"
    cases.update(
        {
            "surrogate classes": [nchw, "--surrogate", f"{five_net}:net={five_weights}"],
            "surrogate missing fn": [nchw, "--surrogate", f"{five_net}:nope={five_weights}"],
            "surrogate bad form": [nchw, "--surrogate", "nonsense"],
            "mean channels": [nchw, "--mean", "0.1,0.2", "--std", "0.3,0.3"],
            "std zero": [nchw, "--std", "0"],
            "mean text": [nchw, "--mean", "a,b"],
            "layout forced": [nchw, "--layout", "nhwc"],
            "pixels on torch": ["small_cnn", "--weights", zoo["other"], "--input-range", "0-255"],
            "white-box on black box": [nchw, "--attack", "pgd"],
            "no data": [nchw, "--data", "cifar10", "--data-dir", tmp_path / "nowhere"],
        }
    )  # fmt: skip
    for name, args in cases.items():
        result = invoke("eval", *args, *(["--data", "digits"] if "--data" not in args else []), "--no-progress",
                        "--json", js, "--save-adv", adv)  # fmt: skip
        assert_one_line_error(result)
        assert not js.exists() and not adv.exists(), name
    assert not list(tmp_path.glob(".out*"))


def test_bad_graph_messages_name_the_problem(zoo, tmp_path):
    graphs = _bad_graphs(tmp_path, zoo)
    expected = {
        "two inputs": "2 inputs",
        "two outputs": "2 outputs",
        "not an image": "not an image batch",
        "not one row": "not one row of scores",
        "fixed shape": "the data's images are 1x8x8",
        "five classes": "scores 5 classes, the data has 10",
    }
    x = zoo["x"]
    for name, path in graphs.items():
        with pytest.raises(NenniError, match=expected[name]):
            with OnnxClassifier(path) as clf:
                clf.bind(x, 10)

"""Issue 18: distillation, budget allocation, ratio annealing, the trainable batch-norm scale, static pruning."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from _cli import assert_one_line_error, invoke
from _nets import tiny_net
from torch import nn

from nenni_deploy.errors import NenniError
from nenni_deploy.models.cifar_resnet import CifarResNet
from nenni_deploy.nenni.allocation import AllocationConfig, allocate, dense_base, model_hash
from nenni_deploy.nenni.config import NenniConfig
from nenni_deploy.nenni.convert import convert
from nenni_deploy.nenni.cost import cost_report
from nenni_deploy.nenni.fit import fit
from nenni_deploy.nenni.io import load_model_dir, save_model_dir
from nenni_deploy.nenni.layers import anneal_ratio, nenni_layers, set_mode
from nenni_deploy.pruning import PruneConfig, prune, residual_reaching
from nenni_deploy.training.config import TrainConfig
from nenni_deploy.training.methods import Distill, check_teacher, dense_base_teacher
from nenni_deploy.training.params import param_groups, select_trainable


@pytest.fixture
def tiny_arch(monkeypatch):
    """tiny_net registered under a name, so that model directories of it can be saved and loaded."""
    from nenni_deploy.models import registry

    info = registry.ModelInfo("tiny_test_net", "test", (3, 8, 8), 10, "none", "magnitude")
    monkeypatch.setitem(registry._FACTORIES, "tiny_test_net", lambda num_classes=10: tiny_net())
    monkeypatch.setitem(registry._INFOS, "tiny_test_net", info)
    return "tiny_test_net"


def _images(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _converted(ratio: float = 0.5):
    net = tiny_net()
    convert(net, NenniConfig(granularity="channel", ratio=ratio, proj_dim="n/2"))
    fit(net, [_images()[0]], progress=False)
    return net


# -- distillation -----------------------------------------------------------------------------------------------
def test_distill_is_cross_entropy_at_alpha_zero_and_zero_against_itself():
    x, y = _images(16)
    student = _converted()
    teacher = dense_base_teacher(student)
    loss, logits = Distill(teacher, alpha=0.0).loss(student, x, y)
    assert torch.allclose(loss, F.cross_entropy(logits, y))
    set_mode(student, "exact")  # the student is now its own teacher: KL is zero
    loss, _ = Distill(teacher, alpha=1.0, temperature=3.0).loss(student, x, y)
    assert abs(float(loss.detach())) < 1e-5


def test_distill_kl_term_matches_its_definition_and_features_are_compared():
    x, y = _images(16)
    student = _converted()
    teacher = dense_base_teacher(student)
    t = 2.0
    method = Distill(teacher, alpha=0.5, temperature=t)
    loss, logits = method.loss(student, x, y)
    with torch.no_grad():
        p_t = F.softmax(teacher(x) / t, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(logits / t, 1))).sum(1).mean()
    expected = 0.5 * F.cross_entropy(logits, y) + 0.5 * t * t * kl
    assert torch.allclose(loss, expected, atol=1e-5)
    layers = tuple(nenni_layers(student))
    with_features = Distill(teacher, alpha=0.5, temperature=t, feature_weight=1.0, feature_layers=layers)
    assert float(with_features.loss(student, x, y)[0]) > float(loss)  # NENNI outputs differ from exact ones
    assert with_features.to_dict()["feature_layers"] == list(layers)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_with_other_class_count_or_bad_settings_is_refused():
    student = tiny_net()
    other = tiny_net()
    other.linear = nn.Linear(32, 7)
    with pytest.raises(NenniError, match="class counts differ"):
        check_teacher(student, other, (3, 8, 8), what="other")
    with pytest.raises(NenniError, match="alpha"):
        Distill(tiny_net(), alpha=1.5)
    with pytest.raises(NenniError, match="no layer"):
        Distill(tiny_net(), feature_weight=1.0, feature_layers=("nope",))


# -- annealing and the schedules ---------------------------------------------------------------------------------
def test_anneal_ratio_runs_every_channel_exact_at_the_start_and_the_target_at_the_end():
    net = _converted(ratio=0.25)
    x, _ = _images(8)
    layer = nenni_layers(net)["block.conv1"]
    anneal_ratio(net, 0.0)
    assert layer.active_spec().essential == layer.spec.out_dim
    set_mode(net, "exact")
    exact = net(x)
    set_mode(net, "nenni")
    assert torch.allclose(net(x), exact, atol=1e-5)  # ratio 1: every neuron exact
    anneal_ratio(net, 0.5)
    assert layer.spec.essential < layer.active_spec().essential < layer.spec.out_dim
    anneal_ratio(net, None)
    assert layer.run_ratio is None and layer.active_spec() is layer.spec
    assert layer.spec.ratio == 0.25  # the saved spec keeps the target


def test_schedule_settings_are_validated_and_the_approximators_get_their_own_rate():
    with pytest.raises(NenniError, match="anneal"):
        TrainConfig(epochs=2, anneal_epochs=3)
    with pytest.raises(NenniError, match="approx-lr-scale"):
        TrainConfig(approx_lr_scale=0)
    net = _converted()
    params = select_trainable(net, "both", train_scale=True)
    groups = {g["group"]: g for g in param_groups(net, params, 5e-4, approx_lr_scale=0.1, scale_lr_scale=0.2)}
    assert groups["approx"]["lr_scale"] == 0.1 and groups["approx"]["weight_decay"] == 0
    scale = net.get_submodule("block.conv1.exact").scale
    assert groups["scale"]["lr_scale"] == 0.2 and any(p is scale for p in groups["scale"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(params)


def test_a_short_fine_tune_with_every_schedule_runs_and_resumes(tmp_path):
    from nenni_deploy.training import train

    x, y = _images(64)
    net = _converted()
    teacher = dense_base_teacher(net)
    config = TrainConfig(
        epochs=2,
        batch_size=16,
        lr=0.01,
        val_split=0.25,
        anneal_epochs=1,
        approx_lr_scale=2.0,
        train_scale=True,
        scale_lr_scale=100.0,  # the tiny net's scale gradients are ~1e-5: make the step visible in float32
    )
    before = net.get_submodule("block.conv1.exact").scale.detach().clone()
    result = train(net, x, y, config, tmp_path, method=Distill(teacher), progress=False, curves=False)
    assert result.epoch == 2
    assert not torch.equal(before, net.get_submodule("block.conv1.exact").scale)  # the scale trained
    assert all(layer.run_ratio is None for layer in nenni_layers(net).values())


# -- the batch-norm scale as a parameter ----------------------------------------------------------------------------
def test_trained_scale_round_trips_and_buffer_era_weights_still_load(tmp_path, tiny_arch):
    net = _converted()
    layer = nenni_layers(net)["block.conv1"]
    with torch.no_grad():
        layer.exact.scale.mul_(1.5)
    specs = [m.spec for m in nenni_layers(net).values()]
    config = NenniConfig(granularity="channel", ratio=0.5, proj_dim="n/2")
    save_model_dir(tmp_path / "m", net, source="tiny_test_net", config=config, specs=specs)
    loaded, _ = load_model_dir(tmp_path / "m")
    assert torch.equal(nenni_layers(loaded)["block.conv1"].exact.scale, layer.exact.scale)
    assert isinstance(nenni_layers(loaded)["block.conv1"].exact.scale, nn.Parameter)
    x, _ = _images(4)
    assert torch.allclose(loaded(x), net.eval()(x))
    assert "block.conv1.exact.scale" in net.state_dict()  # the key a buffer had: older directories load


# -- allocation -------------------------------------------------------------------------------------------------
def _alloc_config(budget: float, metric: str = "macs", **kw) -> AllocationConfig:
    return AllocationConfig(budget=budget, metric=metric, ratios=(0.25, 0.5, 0.75), proj_dims=("n/8",), images=32, **kw)


@pytest.mark.parametrize("metric,budget", [("macs", 0.75), ("bitops", 0.6)])
def test_allocation_meets_the_budget_as_cost_py_counts_it(metric, budget):
    x, y = _images(64)
    net = tiny_net()
    base = NenniConfig(granularity="channel", proj_dim="n/8")
    result = allocate(net, base, x, y, _alloc_config(budget, metric))
    assert result.cost_ratio <= budget and result.chosen()
    chosen = dense_base(net)
    convert(chosen, result.nenni_config(base))
    totals = cost_report(chosen, (3, 8, 8))["totals"]
    assert totals[f"{metric}_nenni"] == result.chosen_cost and totals[f"{metric}_dense"] == result.dense_cost
    for c in result.chosen():
        spec = nenni_layers(chosen)[c.name].spec
        assert (spec.ratio, spec.proj_dim) == (c.ratio, c.proj_dim)
    assert json.loads(json.dumps(result.to_json()))["layers"]


def test_allocation_refuses_infeasible_budgets_and_a_cache_of_another_model(tmp_path):
    x, y = _images(64)
    base = NenniConfig(granularity="channel", proj_dim="n/8")
    with pytest.raises(NenniError, match="cannot be met"):
        allocate(tiny_net(), base, x, y, _alloc_config(0.05))
    for bad in (1.5, 0.0, float("nan")):
        with pytest.raises(NenniError, match=r"\(0, 1\]"):
            _alloc_config(bad)
    with pytest.raises(NenniError, match="ratio granularity"):
        allocate(tiny_net(), dataclasses.replace(base, granularity="nm"), x, y, _alloc_config(0.7))
    cache = tmp_path / "sens.json"
    first = allocate(tiny_net(0), base, x, y, _alloc_config(0.75, cache=str(cache)))
    again = allocate(tiny_net(0), base, x, y, _alloc_config(0.6, cache=str(cache)))
    assert not first.cache_hit and again.cache_hit
    assert json.loads(cache.read_text())["model_sha256"] == model_hash(dense_base(tiny_net(0)))
    with pytest.raises(NenniError, match="another model"):
        allocate(tiny_net(1), base, x, y, _alloc_config(0.75, cache=str(cache)))


# -- static pruning ---------------------------------------------------------------------------------------------
def test_pruning_a_tiny_residual_net_follows_the_dependency_graph(tmp_path, tiny_arch):
    x, y = _images(32)
    net = tiny_net()
    result = prune(net, x, y, PruneConfig(budget_macs=0.6))
    assert result.mode == "dependency-graph"
    assert result.macs_ratio <= 0.6 and result.model(x).shape == (32, 10)
    assert result.layers["linear"] == [10, 10]  # the classifier keeps its classes
    save_model_dir(tmp_path / "p", result.model, source="tiny_test_net", kind="pruned")
    loaded, card = load_model_dir(tmp_path / "p")
    assert card["kind"] == "pruned" and torch.allclose(loaded(x), result.model(x))
    taylor = prune(net, x, y, PruneConfig(budget_macs=0.6, importance="taylor"))
    assert taylor.macs_ratio <= 0.6


def test_pruning_falls_back_where_the_graph_breaks_a_padding_shortcut():
    torch.manual_seed(0)
    net = CifarResNet(blocks_per_stage=1).eval()  # ResNet-8 with the option-A (zero-padding) shortcut
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    reaching = residual_reaching(net)
    assert "layer1.0.conv2" in reaching and "conv1" in reaching and "layer1.0.conv1" not in reaching
    result = prune(net, x, y, PruneConfig(budget_macs=0.7))
    assert result.mode == "non-residual" and "residual" in result.note
    assert result.macs_ratio <= 0.7 and result.model(x).shape == (8, 10)
    assert result.layers["layer2.0.conv2"] == [32, 32] and result.layers["layer2.0.conv1"][1] < 32
    with pytest.raises(NenniError, match="cannot be met"):
        prune(net, x, y, PruneConfig(budget_macs=0.1))


def test_pruned_widths_are_multiples_of_round_to_unless_it_is_one():
    torch.manual_seed(0)
    net = CifarResNet(blocks_per_stage=1).eval()
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    rounded = prune(net, x, y, PruneConfig(budget_macs=0.7))  # the default: multiples of 8
    exact = prune(net, x, y, PruneConfig(budget_macs=0.7, round_to=1))
    assert rounded.round_to == 8 and exact.round_to is None and rounded.to_json()["round_to"] == 8
    assert all(after % 8 == 0 for _, after in rounded.layers.values() if after != 10)
    assert any(after % 8 for _, after in exact.layers.values() if after != 10)  # ResNet-8 at 0.7: odd widths
    assert rounded.macs_ratio <= 0.7 and exact.macs_ratio <= 0.7
    # the nearest multiple, not torch-pruning's floor: a light budget leaves the 16-channel stage whole
    light = prune(net, x, y, PruneConfig(budget_macs=0.9))
    assert light.layers["layer1.0.conv1"] == [16, 16] and 0.8 < light.macs_ratio <= 0.9
    with pytest.raises(NenniError, match="--round-to 1 allows any width"):
        prune(net, x, y, PruneConfig(budget_macs=0.5, round_to=16))
    with pytest.raises(NenniError, match="--round-to"):
        PruneConfig(budget_macs=0.7, round_to=0)


@pytest.mark.parametrize("bad", [1.2, 0.0, -0.5])
def test_prune_budget_out_of_range_is_refused(bad):
    with pytest.raises(NenniError, match="budget"):
        PruneConfig(budget_macs=bad)


# -- one-line errors from the command line ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    assert (
        invoke("train", "--arch", "small_cnn", "--data", "digits", "--epochs", "1", "--out", root / "d").exit_code == 0
    )
    cal = ["calibrate", "--arch", root / "d", "--data", "digits"]
    assert invoke(*cal, "--out", root / "n").exit_code == 0
    return root


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budget-macs", "1.5"], "(0, 1]"),
        (["--budget-macs", "0.01"], "cannot be met"),
        (["--budget-macs", "0.7", "--budget-bitops", "0.5"], "not both"),
        (["--teacher", "nowhere"], "does not exist"),
        (["--anneal-epochs", "5"], "anneal"),
    ],
)
def test_finetune_bad_inputs_are_one_line_errors(digits_models, args, message):
    out = digits_models / "ft-bad"
    result = invoke("finetune", digits_models / "n", "--data", "digits", "--epochs", "1", "--out", out, *args)
    assert_one_line_error(result)
    assert message in result.output
    assert not (out / "config.json").exists()


def test_prune_bad_budget_is_a_one_line_error(digits_models):
    result = invoke(
        "prune",
        "--arch",
        digits_models / "d",
        "--data",
        "digits",
        "--budget-macs",
        "1.2",
        "--out",
        digits_models / "pr-bad",
    )
    assert_one_line_error(result)
    assert not (digits_models / "pr-bad").exists()


def test_a_teacher_directory_of_another_architecture_is_refused(tmp_path, tiny_arch):
    from nenni_deploy.app.finetune import resolve_teacher
    from nenni_deploy.nenni.model import open_model_dir
    from nenni_deploy.training.methods import Standard

    net = _converted()
    specs = [m.spec for m in nenni_layers(net).values()]
    config = NenniConfig(granularity="channel", ratio=0.5, proj_dim="n/2")
    save_model_dir(tmp_path / "t", net, source=tiny_arch, config=config, specs=specs)
    model = open_model_dir(tmp_path / "t")
    other = dataclasses.replace(model, source=dataclasses.replace(model.source, arch="small_cnn"))
    with pytest.raises(NenniError, match="is a tiny_test_net, the model a small_cnn"):
        resolve_teacher(str(tmp_path / "t"), other, Standard(), (3, 8, 8))
    teacher, name = resolve_teacher(str(tmp_path / "t"), model, Standard(), (3, 8, 8))
    assert all(layer.mode == "exact" for layer in nenni_layers(teacher).values()) and name == str(tmp_path / "t")
    assert resolve_teacher("auto", model, Standard(), (3, 8, 8))[1] == "dense-base"
    assert resolve_teacher("none", model, Standard(), (3, 8, 8)) == (None, None)


def test_a_pruned_directory_goes_through_export_check_and_info(digits_models, tmp_path):
    out = tmp_path / "pruned"
    result = invoke(
        "prune", "--arch", digits_models / "d", "--budget-macs", "0.7", "--epochs", "1", "--out", out,
        "--no-progress", "--json", tmp_path / "p.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["pruning"]["macs_ratio"] <= 0.7 and (out / "base.safetensors").is_file()
    assert invoke("export", out, "--out", tmp_path / "p.onnx").exit_code == 0
    check = invoke("check", out, tmp_path / "p.onnx")
    assert check.exit_code == 0 and "check passed" in check.output, check.output
    info = invoke("info", out)
    assert "kind: pruned" in info.output and "dense base sha256" in info.output
    dense = invoke("export", out, "--dense", "--out", tmp_path / "d.onnx")
    assert dense.exit_code == 0, dense.output
    # white-box attacks on the pruned model itself, not on its unpruned base
    for onnx_file, agree in (("p.onnx", "agreement 100.00 %"), ("d.onnx", "agreement 100.00 %")):
        ev = invoke("eval", tmp_path / onnx_file, "--source", out, "--attack", "pgd", "--steps", "2", "--n", "40",
                    "--eps", "0.05", "--no-progress")  # fmt: skip
        assert ev.exit_code == 0 and agree in ev.output, ev.output


def test_a_version_1_directory_reads_and_keeps_a_base_added_later(digits_models, tmp_path):
    """The grid's early points are version-1 NENNI directories: without a base their dense model is the exact
    layers (with a note); with base.safetensors added (benchmarks/frontier_base.py) it is the original."""
    import json
    import shutil

    from nenni_deploy.files import sha256_file
    from nenni_deploy.models import save_state_dict
    from nenni_deploy.nenni.io import load_base_model, load_model_dir

    old = tmp_path / "v1"
    shutil.copytree(digits_models / "n", old)
    card = json.loads((old / "config.json").read_text())
    for key in ("kind", "model", "data", "dense_layers", "base_weights_sha256"):
        card.pop(key, None)
    card["format_version"] = 1
    (old / "base.safetensors").unlink()
    (old / "config.json").write_text(json.dumps(card))
    load_model_dir(old)
    assert load_base_model(old).note and load_base_model(old).sha256 is None

    dense = load_base_model(digits_models / "n")
    save_state_dict(dense.module, old / "base.safetensors")
    card["base_weights_sha256"] = sha256_file(old / "base.safetensors")
    (old / "config.json").write_text(json.dumps(card))
    base = load_base_model(old)
    assert base.sha256 == card["base_weights_sha256"] and not base.note

"""Model registry and families; the acceptance test reproduces the published CIFAR-10 accuracies exactly."""

from __future__ import annotations

import operator
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from nenni_deploy.data import Dataset, iterate_batches, load_dataset
from nenni_deploy.errors import NenniError
from nenni_deploy.models import Normalize, create_model, list_models, model_info, register_model

# model name -> (checkpoint under weights/cifar10, published clean accuracy in %, which reproduces exactly)
PRETRAINED = {
    "resnet20": ("akamaster/resnet20-12fca82f.th", 91.73),
    "resnet32": ("akamaster/resnet32-d509ac18.th", 92.63),
    "resnet44": ("akamaster/resnet44-014dd654.th", 93.10),
    "resnet56": ("akamaster/resnet56-4bfd9763.th", 93.39),
    "resnet2b": ("abcrown/resnet2b.pth", 69.25),
    "resnet4b": ("abcrown/resnet4b.pth", 77.20),
    "cnn_a_adv": ("abcrown/cnn_a_adv.model", 65.65),
}


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(NenniError, match="unknown model 'resnet21'.*resnet20.*small_cnn"):
        create_model("resnet21")
    with pytest.raises(NenniError, match="unknown model"):
        model_info("resnet21")


def test_registry_lists_every_family() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(PRETRAINED) | {"resnet110", "preact_resnet18", "wide_resnet34_10", "small_cnn"} <= set(names)
    assert list_models(dataset="digits") == ["small_cnn"]
    assert list_models(family="abcrown") == ["cnn_a_adv", "resnet2b", "resnet4b"]


def test_model_info_metadata() -> None:
    info = model_info("resnet20")
    assert (info.family, info.input_shape, info.num_classes, info.dataset) == (
        "cifar_resnet",
        (3, 32, 32),
        10,
        "cifar10",
    )
    assert info.default_pre_residual == "magnitude"
    assert model_info("small_cnn").input_shape == (1, 8, 8)
    assert info.to_dict()["name"] == "resnet20"


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="twice"):
        register_model("resnet20", family="x", input_shape=(3, 32, 32), num_classes=10, dataset="cifar10")(
            lambda num_classes=10: nn.Identity()
        )


@pytest.mark.parametrize("name", list_models())
def test_every_model_runs_its_input_shape(name: str) -> None:
    info = model_info(name)
    model = create_model(name)
    assert not model.training, "create_model returns an eval-mode model"
    with torch.inference_mode():
        out = model(torch.rand(2, *info.input_shape))
    assert out.shape == (2, info.num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list_models())
def test_every_model_normalises_inside_and_traces_with_fx(name: str) -> None:
    model = create_model(name)
    assert isinstance(model.normalize, Normalize)
    assert not any("normalize" in key for key in model.state_dict()), "normalisation is not a weight"
    traced = fx.symbolic_trace(model)
    x = torch.rand(2, *model_info(name).input_shape)
    torch.testing.assert_close(traced(x), model(x))


def test_num_classes_override() -> None:
    assert create_model("resnet20", num_classes=100)(torch.rand(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize(
    ("name", "millions"), [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85)]
)
def test_cifar_resnet_parameter_counts(name: str, millions: float) -> None:
    count = sum(p.numel() for p in create_model(name).parameters())
    assert round(count / 1e6, 2) == millions


def test_cifar_resnet_blocks_show_conv_bn_add_relu_to_fx() -> None:
    """The NENNI converter relies on this shape: conv2 -> bn2 -> add(shortcut) -> relu, plain functions."""
    graph = fx.symbolic_trace(create_model("resnet20")).graph
    nodes = {node.name: node for node in graph.nodes}
    bn2 = nodes["layer2_0_bn2"]
    assert bn2.args[0].target == "layer2.0.conv2"
    (add,) = bn2.users
    assert add.target is operator.add
    (relu,) = add.users
    assert relu.target is F.relu


def test_option_a_shortcut_pads_channels_and_pickles() -> None:
    model = create_model("resnet20")
    shortcut = model.layer2[0].shortcut
    x = torch.rand(1, 16, 32, 32)
    out = shortcut(x)
    assert out.shape == (1, 32, 16, 16)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0
    clone = pickle.loads(pickle.dumps(model))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(clone(x), model(x))


def test_wide_resnet_without_sub_block1_has_the_same_outputs() -> None:
    torch.manual_seed(0)
    full = create_model("wide_resnet34_10")
    lean = create_model("wide_resnet34_10", sub_block1=False)
    lean.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("sub_block1.")})
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(lean(x), full(x))


@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_pretrained_checkpoints_load_strictly(name: str, weights_dir: Path) -> None:
    create_model(name, weights=weights_dir / PRETRAINED[name][0])


@pytest.fixture(scope="module")
def cifar10_test(cifar10_dir: Path) -> Dataset:
    torch.set_num_threads(2)
    return load_dataset("cifar10", "test", cifar10_dir)


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRETRAINED))
def test_pretrained_accuracy_is_reproduced_exactly(name: str, weights_dir: Path, cifar10_test: Dataset) -> None:
    weights, published = PRETRAINED[name]
    model = create_model(name, weights=weights_dir / weights)
    correct = 0
    with torch.inference_mode():
        for x, y in iterate_batches(cifar10_test.x, cifar10_test.y, 500):
            correct += int((model(x).argmax(1) == y).sum())
    assert len(cifar10_test) == 10_000
    assert correct == round(published * 100), f"{name}: {correct / 100:.2f} % vs published {published} %"

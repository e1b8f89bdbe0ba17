"""The shared attack core: budgets, determinism, strength on an undefended model, BPDA and EOT gradients."""

from __future__ import annotations

import pytest
import torch
from _nets import tiny_net

from nenni_deploy.attacks import (
    PGD,
    cosine_distance,
    feature_objective,
    features,
    fgsm_rs,
    margin_loss,
    straight_through,
)
from nenni_deploy.errors import NenniError
from nenni_deploy.nenni.config import NenniConfig
from nenni_deploy.nenni.convert import convert
from nenni_deploy.nenni.fit import fit
from nenni_deploy.nenni.layers import nenni_layers, seed_noise


def nenni_tiny(noise="none", granularity="element"):
    net = tiny_net()
    convert(net, NenniConfig(granularity=granularity, ratio=0.5, proj_dim="n/2", noise=noise, noise_scale=1.0))
    x = torch.rand(96, 3, 12, 12)
    fit(net, [x[:48], x[48:]], progress=False)
    return net.eval()


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("restarts", [1, 2])
def test_pgd_stays_in_budget_and_image_range(norm, restarts):
    x, y = batch()
    eps = 8 / 255 if norm == "linf" else 0.5
    adv = PGD(eps=eps, steps=5, norm=norm, restarts=restarts).perturb(tiny_net(), x, y)
    assert adv.min() >= 0 and adv.max() <= 1
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert (size > 0).any()


def test_pgd_is_deterministic_under_its_seed_and_leaves_parameter_gradients_alone():
    net, (x, y) = tiny_net(), batch()
    a = PGD(eps=4 / 255, steps=3, seed=5).perturb(net, x, y)
    b = PGD(eps=4 / 255, steps=3, seed=5).perturb(net, x, y)
    c = PGD(eps=4 / 255, steps=3, seed=6).perturb(net, x, y)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(p.grad is None for p in net.parameters())
    assert not net.training


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_reaches_zero_accuracy_on_an_undefended_model_at_large_eps(loss):
    torch.manual_seed(0)
    net, (x, _) = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 10)).eval(), batch(32)
    y = net(x).argmax(1)  # start from 100 % accuracy
    adv = PGD(eps=0.5, steps=20, loss=loss).perturb(net, x, y)
    assert (net(adv).argmax(1) == y).float().mean().item() == 0.0


def test_fgsm_rs_is_one_step_of_size_one_and_a_quarter_eps():
    attack = fgsm_rs(8 / 255)
    assert attack.steps == 1 and attack.random_start and attack.step_size == pytest.approx(1.25 * 8 / 255)


def test_margin_loss_is_best_wrong_minus_true():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    assert margin_loss(logits, torch.tensor([0, 2])).tolist() == [-1.0, 4.0]


@pytest.mark.parametrize(
    "bad", [dict(eps=-1), dict(eps=0.1, steps=0), dict(eps=0.1, norm="l1"), dict(eps=0.1, loss="x")]
)
def test_pgd_rejects_settings_out_of_range(bad):
    with pytest.raises(NenniError):
        PGD(**bad)


def _input_grad(net, x, y):
    x = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    return x.grad


def test_bpda_keeps_the_forward_pass_and_backpropagates_through_the_exact_layers():
    net, (x, y) = nenni_tiny(), batch()
    dense = nenni_tiny()
    for layer in nenni_layers(dense).values():
        layer.mode = "exact"
    with torch.no_grad():
        out = net(x)
    true_grad = _input_grad(net, x, y)
    with straight_through(net, "exact"):
        with torch.no_grad():
            assert torch.equal(net(x), out)
        bpda_grad = _input_grad(net, x, y)
    assert not torch.allclose(bpda_grad, true_grad)
    # With a single NENNI layer the straight-through gradient is the dense layer's Jacobian at NENNI's output.
    assert all(layer.gradient == "true" for layer in nenni_layers(net).values())
    with straight_through(net, "approx"):
        approx_grad = _input_grad(net, x, y)
    assert not torch.allclose(approx_grad, bpda_grad)


def test_bpda_of_a_single_layer_equals_the_exact_layer_vector_jacobian_product():
    layer = nenni_layers(nenni_tiny())["block.conv1"]
    x = torch.rand(4, 16, 12, 12, requires_grad=True)
    g_out = torch.randn(4, 16, 12, 12)
    with straight_through(layer, "exact"):
        (gx,) = torch.autograd.grad((layer(x) * g_out).sum(), x)
    (true,) = torch.autograd.grad((layer(x) * g_out).sum(), x)
    (expected,) = torch.autograd.grad((layer.exact(x) * g_out).sum(), x)
    assert not torch.allclose(true, expected)
    torch.testing.assert_close(gx, expected)


def test_bpda_refuses_a_model_without_nenni_layers():
    with pytest.raises(NenniError, match="no NENNI layers"), straight_through(tiny_net()):
        pass


def test_eot_averages_gradients_over_noise_draws():
    net, (x, y) = nenni_tiny(noise="gaussian"), batch(8)
    seed_noise(net, None)
    torch.manual_seed(0)
    one_a, _ = PGD(eps=0.03, eot=1).gradient(
        net, x, y, lambda m, xa, ya: torch.nn.functional.cross_entropy(m(xa), ya, reduction="none")
    )
    one_b, _ = PGD(eps=0.03, eot=1).gradient(
        net, x, y, lambda m, xa, ya: torch.nn.functional.cross_entropy(m(xa), ya, reduction="none")
    )
    assert not torch.allclose(one_a, one_b)  # a single draw is noisy
    obj = lambda m, xa, ya: torch.nn.functional.cross_entropy(m(xa), ya, reduction="none")  # noqa: E731
    many_a, _ = PGD(eps=0.03, eot=64).gradient(net, x, y, obj)
    many_b, _ = PGD(eps=0.03, eot=64).gradient(net, x, y, obj)
    # Averaging shrinks the draw-to-draw spread (about 1/sqrt(64) of it).
    assert (many_a - many_b).norm() < 0.5 * (one_a - one_b).norm()


def test_feature_objective_drives_the_chosen_layer_away_from_its_clean_features():
    net, (x, y) = tiny_net(), batch(8)
    clean = features(net, x, "block")
    adv = PGD(eps=16 / 255, steps=10).perturb(net, x, y, feature_objective("block", clean))
    noisy = (x + (16 / 255) * torch.sign(torch.randn_like(x))).clamp(0, 1)
    attacked = cosine_distance(features(net, adv, "block"), clean)
    assert (attacked > 1.5 * cosine_distance(features(net, noisy, "block"), clean)).all()
    assert cosine_distance(features(net, x, "block"), clean).abs().max() < 1e-5
    # Added to an output loss, the weighted term is exactly what it says.
    obj = feature_objective("block", clean, weight=-0.5, base=lambda m, xa, ya: torch.zeros(len(xa)))
    torch.testing.assert_close(obj(net, adv, y), -0.5 * cosine_distance(features(net, adv, "block"), clean))


def test_feature_objective_names_a_missing_layer():
    with pytest.raises(NenniError, match="no layer named"):
        feature_objective("nope", torch.zeros(1))(tiny_net(), *batch(2))


def test_autoattack_iterations_follow_the_packages_own_schedule():
    """set_iterations copies APGD's derived schedule; this fails when pyautoattack renames or re-derives it."""
    from pyautoattack import AutoAttack
    from pyautoattack.autopgd_base import APGDAttack

    from nenni_deploy.attacks.autoattack import APGD_SCHEDULE, set_iterations

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    adversary = AutoAttack(net, eps=0.1, norm="Linf", version="standard", seed=0)
    set_iterations(adversary, 37)
    built = APGDAttack(net, n_iter=37, eps=0.1, norm="Linf")
    for attack in (adversary.apgd, adversary.apgd_targeted):
        assert {n: getattr(attack, n) for n in APGD_SCHEDULE} == {n: getattr(built, n) for n in APGD_SCHEDULE}
    assert adversary.fab.n_iter == 37 and built.n_iter_2 == max(int(0.22 * 37), 1)

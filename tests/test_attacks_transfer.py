"""Transfer-attack options on the one PGD loop (MI-FGSM momentum, DI), ensembles, and the AutoAttack wrapper."""

from __future__ import annotations

import pytest
import torch
from _nets import tiny_net

from nenni_deploy.attacks import PGD, LogitEnsemble, autoattack, mi_fgsm
from nenni_deploy.data import load_dataset
from nenni_deploy.errors import NenniError


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(scope="module")
def digits_linear():
    """A softmax regression on digits (trained in about a second): accuracy under attack falls gradually with eps,
    so two attacks' numbers can be compared away from 0 and 100 %."""
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(train.x), train.y).backward()
        opt.step()
    return model.eval(), test.x[:200], test.y[:200]


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("options", [dict(momentum=1.0), dict(diversity=1.0), dict(momentum=1.0, diversity=0.5)])
def test_momentum_and_diversity_stay_in_budget_are_seeded_and_change_the_attack(norm, options):
    x, y = batch()
    eps = 8 / 255 if norm == "linf" else 0.5
    net = tiny_net()
    adv = PGD(eps=eps, steps=5, norm=norm, seed=3, **options).perturb(net, x, y)
    again = PGD(eps=eps, steps=5, norm=norm, seed=3, **options).perturb(net, x, y)
    plain = PGD(eps=eps, steps=5, norm=norm, seed=3).perturb(net, x, y)
    assert torch.equal(adv, again)
    assert not torch.equal(adv, plain)
    assert adv.min() >= 0 and adv.max() <= 1
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all()


def test_pgd_keeps_its_positional_signature_for_existing_callers():
    x, y = batch(4)
    positional = PGD(4 / 255, 3, None, "linf", "ce", True, 1, 1, 7).perturb(tiny_net(), x, y)
    named = PGD(eps=4 / 255, steps=3, seed=7).perturb(tiny_net(), x, y)
    assert torch.equal(positional, named)


def test_input_diversity_shrinks_and_pads_to_the_same_size():
    x = torch.rand(2, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    out = PGD(eps=0.1, diversity=1.0)._diverse(x, gen)
    assert out.shape == x.shape and not torch.equal(out, x)
    # Padding is zeros: the shrunk image fills at most (32 x 32) and at least the 28-pixel square.
    assert (out == 0).any()
    assert torch.equal(PGD(eps=0.1, diversity=0.0)._diverse(x, gen), x)


def test_mi_fgsm_is_published_settings():
    attack = mi_fgsm(8 / 255, steps=10)
    assert not attack.random_start and attack.momentum == 1.0 and attack.step_size == pytest.approx(0.8 / 255)


@pytest.mark.parametrize("bad", [dict(momentum=-1), dict(diversity=1.5)])
def test_transfer_options_out_of_range_are_refused(bad):
    with pytest.raises(NenniError):
        PGD(eps=0.1, **bad)


def test_logit_ensemble_is_the_mean_of_its_members():
    a, b = tiny_net(0), tiny_net(1)
    x, _ = batch(4)
    with torch.no_grad():
        torch.testing.assert_close(LogitEnsemble([a, b])(x), (a(x) + b(x)) / 2)
    with pytest.raises(NenniError):
        LogitEnsemble([])


def test_autoattack_stays_in_budget_and_agrees_with_own_pgd(digits_linear):
    model, x, y = digits_linear
    eps = 0.08
    clean = (model(x).argmax(1) == y).float().mean().item()
    adv_aa, warnings = autoattack(model, x, y, eps, version="custom", attacks=["apgd-ce"], seed=0)
    assert isinstance(warnings, list)
    assert adv_aa.min() >= 0 and adv_aa.max() <= 1
    assert (adv_aa - x).abs().max() <= eps + 1e-6
    adv_pgd = PGD(eps=eps, steps=50, restarts=2).perturb(model, x, y)
    with torch.no_grad():
        acc_aa = ((model(adv_aa).argmax(1) == y).float().mean().item()) * 100
        acc_pgd = ((model(adv_pgd).argmax(1) == y).float().mean().item()) * 100
    assert 10 < acc_aa < clean * 100 - 10  # the comparison is away from the trivial ends
    assert abs(acc_aa - acc_pgd) <= 4.0


@pytest.mark.parametrize(
    "kw", [dict(version="fast"), dict(version="custom"), dict(version="custom", attacks=["nope"]), dict(norm="l1")]
)
def test_autoattack_rejects_bad_settings(kw):
    x, y = batch(2)
    with pytest.raises(NenniError):
        autoattack(tiny_net(), x, y, 0.03, **kw)

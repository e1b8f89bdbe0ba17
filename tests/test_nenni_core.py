"""The method's building blocks: projection, selection, folding, fitting, the two executions, cost, save/load."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _nets import tiny_net
from torch import nn

from nenni_deploy.errors import NenniError
from nenni_deploy.nenni import selection
from nenni_deploy.nenni.config import LayerSpec, NenniConfig, parse_nm, resolve_proj_dim
from nenni_deploy.nenni.convert import analyse, conversion_plan, convert, fold_batchnorm
from nenni_deploy.nenni.cost import layer_costs, totals
from nenni_deploy.nenni.fit import NormalEquations, fit
from nenni_deploy.nenni.layers import (
    ScaledConv2d,
    nenni_layers,
    seed_noise,
    set_execution,
    set_mode,
)
from nenni_deploy.nenni.projection import layer_seed, ternary_projection
from nenni_deploy.nenni.quant import fake_quantize


def converted(granularity="element", ratio=0.5, proj_dim="n/2", **kw):
    net = tiny_net()
    specs = convert(net, NenniConfig(granularity=granularity, ratio=ratio, proj_dim=proj_dim, **kw))
    x = torch.rand(96, 3, 12, 12)
    fit(net, [x[:48], x[48:]], progress=False)
    return net, specs, x


# -- projection ---------------------------------------------------------------------------------------------
def test_projection_is_sparse_ternary_with_achlioptas_scale():
    k = 64
    p = ternary_projection((k, 32, 3, 3), seed=3)
    scale = math.sqrt(3 / k)
    values = np.unique(p.numpy())
    np.testing.assert_allclose(values, [-scale, 0.0, scale], rtol=1e-6)
    density = (p != 0).float().mean().item()
    assert abs(density - 1 / 3) < 0.01
    assert abs((p > 0).float().mean().item() - (p < 0).float().mean().item()) < 0.01


def test_projection_preserves_norm_on_average():
    p = ternary_projection((256, 128), seed=0)
    x = torch.randn(512, 128)
    ratio = ((x @ p.T).norm(dim=1) / x.norm(dim=1)).mean().item()
    assert abs(ratio - 1) < 0.05


def test_projection_seed_determinism():
    a = ternary_projection((8, 4, 3, 3), seed=11)
    assert torch.equal(a, ternary_projection((8, 4, 3, 3), seed=11))
    assert not torch.equal(a, ternary_projection((8, 4, 3, 3), seed=12))
    assert layer_seed(0, 1) != layer_seed(0, 2) and layer_seed(5, 1) == layer_seed(5, 1)


# -- selection against brute force ----------------------------------------------------------------------------
def _spec(**kw):
    base = dict(
        name="l",
        kind="conv",
        in_dim=9,
        out_dim=16,
        proj_dim=4,
        ratio=0.25,
        granularity="element",
        nm=None,
        rank="signed",
        noise="none",
        noise_scale=1.0,
        seed=0,
        approx_bits=32,
    )
    base.update(kw)
    return LayerSpec(**base)


def test_element_mask_matches_brute_force():
    torch.manual_seed(0)
    z = torch.randn(3, 16, 4, 5)
    mask = selection.select(z, _spec(ratio=0.25))
    for b in range(3):
        for i in range(4):
            for j in range(5):
                col = z[b, :, i, j]
                expected = set(sorted(range(16), key=lambda c: -col[c])[:4])
                assert set(torch.nonzero(mask[b, :, i, j]).flatten().tolist()) == expected


def test_magnitude_rank_uses_absolute_values():
    z = torch.tensor([[5.0, -9.0, 1.0, -0.5]])
    assert selection.select(z, _spec(out_dim=4, ratio=0.25, kind="linear")).tolist() == [[True, False, False, False]]
    got = selection.select(z, _spec(out_dim=4, ratio=0.25, kind="linear", rank="magnitude"))
    assert got.tolist() == [[False, True, False, False]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_mask_matches_brute_force(n, m):
    torch.manual_seed(1)
    z = torch.randn(2, 16, 3, 3)
    mask = selection.select(z, _spec(granularity="nm", nm=(n, m)))
    assert mask.sum().item() == 2 * 16 // m * n * 9
    for b in range(2):
        for g in range(16 // m):
            for i in range(3):
                for j in range(3):
                    vals = z[b, g * m : (g + 1) * m, i, j]
                    expected = set(sorted(range(m), key=lambda c: -vals[c])[:n])
                    got = torch.nonzero(mask[b, g * m : (g + 1) * m, i, j]).flatten().tolist()
                    assert set(got) == expected


def test_channel_mask_keeps_whole_channels_by_spatial_mean():
    torch.manual_seed(2)
    z = torch.randn(4, 16, 5, 5)
    mask = selection.select(z, _spec(granularity="channel", ratio=0.25))
    for b in range(4):
        means = z[b].mean((1, 2))
        expected = set(torch.argsort(means, descending=True)[:4].tolist())
        chosen = {c for c in range(16) if mask[b, c].all()}
        assert chosen == expected
        assert all(not mask[b, c].any() for c in range(16) if c not in expected)


def test_threshold_mask():
    z = torch.tensor([[0.1, 0.5, 0.9, -2.0]])
    assert selection.select(z, _spec(out_dim=4, granularity="threshold", threshold=0.4)).tolist() == [
        [False, True, True, False]
    ]


# -- configuration --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(ratio=0),
        dict(ratio=1.5),
        dict(ratio=float("nan")),
        dict(granularity="block"),
        dict(noise="uniform"),
        dict(approx_bits=1),
        dict(nm="8:4"),
        dict(nm="4-8"),
        dict(noise="gaussian", noise_scale=0.0),
        dict(ridge=-1),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs):
    with pytest.raises(NenniError) as info:
        NenniConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_proj_dim_forms():
    assert resolve_proj_dim("n/4", 64, 576) == 16
    assert resolve_proj_dim("0.25", 64, 576) == 16
    assert resolve_proj_dim("12", 64, 576) == 12
    assert resolve_proj_dim("1000", 64, 576) == 576
    with pytest.raises(NenniError):
        resolve_proj_dim("a lot", 64, 576)
    assert parse_nm("2:4") == (2, 4)


def test_config_round_trips_through_json_dict():
    cfg = NenniConfig(granularity="nm", nm="2:4", ratios={"block.*": 0.3}, exclude=["fc1"])
    assert NenniConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(NenniError):
        NenniConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# -- conversion ---------------------------------------------------------------------------------------------
def test_batchnorm_folding_is_exact():
    net = tiny_net()
    x = torch.rand(8, 3, 12, 12)
    ref = net(x)
    fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert isinstance(net.block.conv2, ScaledConv2d)
    torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)


def test_default_eligibility_and_ranking_rule():
    net = tiny_net()
    specs = convert(net, NenniConfig())
    names = {s.name: s.rank for s in specs}
    assert names == {"block.conv1": "signed", "block.conv2": "magnitude", "down": "signed", "fc1": "signed"}
    assert [i.name for i in analyse(tiny_net())][0] == "conv1"


def test_include_exclude_patterns():
    specs = convert(tiny_net(), NenniConfig(include=["block.*", "linear"], exclude=["block.conv1"]))
    assert [s.name for s in specs] == ["block.conv2", "linear"]
    with pytest.raises(NenniError, match="no layer matches"):
        convert(tiny_net(), NenniConfig(include=["nothing*"]))


def test_unsupported_layers_stay_dense_with_the_reason():
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 8, 1),
        nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    plan = conversion_plan(net, NenniConfig())
    assert [s.name for s in plan.specs] == ["3"]
    reasons = {d["name"]: d["reason"] for d in plan.dense}
    assert "depthwise" in reasons["1"] and "grouped" in reasons["2"]
    assert "first convolution" in reasons["0"] and "classifier" in reasons["5"]
    only_grouped = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(NenniError, match="no layer of this model can be converted.*grouped"):
        convert(only_grouped, NenniConfig())


def test_nm_needs_divisible_width():
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(NenniError, match="multiple of M"):
        convert(net, NenniConfig(granularity="nm", nm="4:8"))


# -- fitting ------------------------------------------------------------------------------------------------
def test_normal_equations_recover_an_exact_linear_map():
    torch.manual_seed(0)
    w, b = torch.randn(5, 3), torch.randn(5)
    eqs = NormalEquations.zeros(3, 5)
    for _ in range(4):
        u = torch.randn(100, 3)
        eqs.add(u, u @ w.T + b)
    w_hat, b_hat = eqs.solve(ridge=0.0)
    torch.testing.assert_close(w_hat.float(), w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b_hat.float(), b, atol=1e-5, rtol=1e-5)
    assert eqs.sse(w_hat, b_hat).abs().max() < 1e-6


def test_fit_reduces_the_prediction_error():
    net, specs, x = converted()
    layer = net.block.conv1
    with torch.no_grad():
        inp = torch.relu(net.conv1(x))
        z = layer.exact(inp)
        err_fitted = (layer.predict(inp) - z).pow(2).mean()
        err_zero = (layer.approx_bias.detach()[None, :, None, None] * 0 - z).pow(2).mean()
    assert err_fitted < 0.8 * err_zero
    assert all(0 < s.fit_rel_error < 1 for s in specs)
    assert all(s.residual_rms > 0 for s in specs)


def test_more_projection_dims_fit_better():
    _, small, _ = converted(proj_dim="2")
    _, large, _ = converted(proj_dim="n")
    assert sum(s.fit_rel_error for s in large) < sum(s.fit_rel_error for s in small)


def test_threshold_granularity_hits_its_ratio_on_calibration_data():
    net, specs, x = converted(granularity="threshold", ratio=0.3)
    layer = net.block.conv1
    with torch.no_grad():
        inp = torch.relu(net.conv1(x))
        frac = selection.select(layer.predict(inp), layer.spec).float().mean().item()
    assert abs(frac - 0.3) < 0.05


def test_fake_quantize_levels_and_straight_through():
    w = torch.randn(6, 10, requires_grad=True)
    q = fake_quantize(w, 4)
    for row in q.detach():
        assert len(torch.unique(row)) <= 15
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert fake_quantize(w, 32) is w


# -- the two executions and the output rule -------------------------------------------------------------------
def test_masked_and_skipping_forward_agree():
    net, _, x = converted(granularity="channel", ratio=0.25)
    masked = net(x)
    set_execution(net, "skip")
    assert net.block.conv1.execution == "skip" and net.fc1.execution == "skip"
    torch.testing.assert_close(net(x), masked, atol=1e-5, rtol=1e-5)


def test_output_takes_exact_values_on_essential_neurons_and_prediction_elsewhere():
    net, _, x = converted(granularity="element", ratio=0.5)
    layer = net.block.conv1
    with torch.no_grad():
        inp = torch.relu(net.conv1(x))
        out, z, pred = layer(inp), layer.exact(inp), layer.predict(inp)
        mask = selection.select(pred, layer.spec)
    torch.testing.assert_close(out[mask], z[mask])
    torch.testing.assert_close(out[~mask], pred[~mask])
    assert mask.float().mean().item() == pytest.approx(0.5)


def test_gradient_flows_through_exact_and_prediction_not_mask():
    net, _, x = converted(granularity="element", ratio=0.5)
    layer = net.block.conv1
    inp = torch.relu(net.conv1(x[:4])).detach().requires_grad_(True)
    layer(inp).sum().backward()
    assert layer.exact.weight.grad is not None and layer.exact.weight.grad.abs().sum() > 0
    assert layer.approx_weight.grad.abs().sum() > 0


def test_exact_mode_is_the_folded_dense_model():
    ref_net = tiny_net()
    x = torch.rand(4, 3, 12, 12)
    ref = ref_net(x)
    net, _, _ = converted()
    set_mode(net, "exact")
    torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-5)


def test_gaussian_noise_is_fresh_and_reproducible_under_a_seed():
    net, specs, x = converted(noise="gaussian", noise_scale=1.0)
    a, b = net(x), net(x)
    assert not torch.allclose(a, b)
    seed_noise(net, 7)
    c = net(x)
    seed_noise(net, 7)
    torch.testing.assert_close(net(x), c)
    noise = net.block.conv1.fill(torch.zeros(2000, 16))
    assert noise.std().item() == pytest.approx(specs[0].residual_rms, rel=0.1)


# -- cost ---------------------------------------------------------------------------------------------------
def test_cost_of_a_hand_computed_layer():
    # One 3x3 conv 8->16 on a 6x6 map (pad 1): d = 72, n = 16, 36 positions; k = 4, K = 4 (ratio 0.25).
    net = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 36, 2))
    convert(net, NenniConfig(granularity="channel", ratio=0.25, proj_dim="4"))
    rows = {r.name: r for r in layer_costs(net, (8, 6, 6))}
    r = rows["1"]
    nnz = int(torch.count_nonzero(net[1].proj))
    assert (r.in_dim, r.out_dim, r.positions, r.proj_dim, r.essential) == (72, 16, 36, 4, 4)
    assert r.macs_dense == 36 * 16 * 72
    assert r.macs_exact == 36 * 4 * 72
    assert r.macs_approx == 36 * 16 * 4
    assert r.macs_projection == 36 * 4 * 72
    assert r.adds_projection == 36 * nnz
    assert r.macs_nenni == r.macs_exact + r.macs_approx + r.macs_projection
    assert r.bitops_dense == r.macs_dense * 64
    assert r.bitops_nenni == r.macs_exact * 64 + r.macs_approx * 8 * 8 + 36 * nnz * 8
    assert rows["0"].macs_dense == rows["0"].macs_nenni == 36 * 8 * 8
    t = totals(list(rows.values()))
    assert t["macs_dense"] == 36 * 64 + 36 * 16 * 72 + 2 * 576
    assert 0 < t["mac_reduction"] < 1


def test_streaming_fit_matches_the_cached_graph_walk():
    """Past the cache limit each layer's inputs are recomputed batch by batch: same approximators."""
    x = torch.rand(64, 3, 12, 12)
    fitted = []
    for cache in (10_000, 0):
        net = tiny_net()
        convert(net, NenniConfig(granularity="threshold", ratio=0.4, proj_dim="n/2"))
        results = fit(net, [x[:32], x[32:]], progress=False, cache_images=cache)
        fitted.append((net, results))
    (a, ra), (b, rb) = fitted
    assert [r.name for r in ra] == [r.name for r in rb] == ["block.conv1", "block.conv2", "down", "fc1"]
    for la, lb in zip(nenni_layers(a).values(), nenni_layers(b).values(), strict=True):
        torch.testing.assert_close(la.approx_weight, lb.approx_weight)
        assert la.spec.threshold == pytest.approx(lb.spec.threshold)
    torch.testing.assert_close(a(x), b(x))


def test_mode_strings_are_checked_where_they_enter():
    net = tiny_net()
    specs = convert(net, NenniConfig())
    layer = nenni_layers(net)[specs[0].name]
    for attr, good in (("mode", "exact"), ("execution", "skip"), ("gradient", "approx")):
        setattr(layer, attr, good)
        with pytest.raises(ValueError, match=f"NenniLayer.{attr} must be one of"):
            setattr(layer, attr, "typo")
        assert getattr(layer, attr) == good
    copied = copy.deepcopy(layer)
    assert (copied.mode, copied.execution, copied.gradient) == ("exact", "skip", "approx")
    with pytest.raises(NenniError, match="rank must be one of"):
        LayerSpec.from_dict({**specs[0].to_dict(), "rank": "magnitudes"})
    with pytest.raises(ValueError, match="rank must be signed or magnitude"):
        selection.ranking_score(torch.zeros(1, 2), "auto")

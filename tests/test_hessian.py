"""Hutchinson trace estimator: agreement with exact Hessians, honest standard errors, bad input."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from fbnas import Arch, build_model, load_space
from fbnas.errors import ConfigError, NonFiniteLossError
from fbnas.hessian import (HessianConvergenceWarning, child_groups, hutchinson_traces, omega, omega_table,
                           quant_error)
from fbnas.quant.fake import quant_error_sq




def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2),
                        nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def tiny_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]


def tiny_groups(net):
    return {"c1": [net[0].weight, net[0].bias], "c2": [net[3].weight], "fc": [net[7].weight, net[7].bias]}


def exact_traces(net, batches, groups):
    """Tr(H_g)/n_g of the mean loss over the batches, from the full Hessian (BN in eval mode)."""
    net.eval()
    params = {n: p.detach() for n, p in net.named_parameters()}
    name_of = {id(p): n for n, p in net.named_parameters()}

    def loss(pd):
        return sum(nn.functional.cross_entropy(torch.func.functional_call(net, pd, (x,)), y)
                   for x, y in batches) / len(batches)

    hess = torch.func.hessian(loss)(params)
    out = {}
    for g, ps in groups.items():
        tr = sum(torch.diagonal(hess[name_of[id(p)]][name_of[id(p)]].reshape(p.numel(), p.numel())).sum().item()
                 for p in ps)
        out[g] = tr / sum(p.numel() for p in ps)
    return out


@pytest.mark.parametrize("method", ["loop", "batched:16", "func:16"])
def test_estimates_within_three_se_of_exact_hessian(method):
    net, batches = tiny_net(), tiny_batches()
    groups = tiny_groups(net)
    exact = exact_traces(net, batches, groups)
    with warnings.catch_warnings():  # c1's trace is close to 0: its relative SE stays above target at the cap
        warnings.simplefilter("ignore", HessianConvergenceWarning)
        res = hutchinson_traces(net, None, batches, groups, target_rel_se=0.1, max_probes=600, method=method)
    assert res.method == method
    assert res.groups["c2"].converged and res.groups["fc"].converged
    for g, tr in exact.items():
        est = res.groups[g]
        assert abs(est.trace_per_param - tr) <= 3 * est.se, (g, est, tr)
        assert est.n_params == sum(p.numel() for p in groups[g])
        assert est.rel_se <= 0.1 if est.converged else est.n_probes == 600


def test_engines_agree_and_same_seed_reproduces():
    net, batches = tiny_net(), tiny_batches()
    groups = tiny_groups(net)
    kw = dict(target_rel_se=0.1, max_probes=200)
    a = hutchinson_traces(net, None, batches, groups, method="loop", seed=3, **kw)
    b = hutchinson_traces(net, None, batches, groups, method="batched:4", seed=3, **kw)
    c = hutchinson_traces(net, None, batches, groups, method="loop", seed=3, **kw)
    d = hutchinson_traces(net, None, batches, groups, method="loop", seed=4, **kw)
    for g in groups:
        assert a.groups[g] == c.groups[g]
        assert b.groups[g].trace_per_param == pytest.approx(a.groups[g].trace_per_param, rel=1e-5)
        assert a.groups[g].n_probes == b.groups[g].n_probes
    assert any(a.groups[g].trace_per_param != d.groups[g].trace_per_param for g in groups)


def test_reported_se_matches_spread_over_seeds():
    net, batches = tiny_net(), tiny_batches()
    groups = tiny_groups(net)
    est, se = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HessianConvergenceWarning)
        for seed in range(40):
            r = hutchinson_traces(net, None, batches, groups, target_rel_se=1e-9, max_probes=64, method="batched:16",
                                  seed=seed)
            est.append([r.groups[g].trace_per_param for g in groups])
            se.append([r.groups[g].se for g in groups])
    ratio = np.std(est, axis=0, ddof=1) / np.mean(se, axis=0)
    assert np.all((ratio > 0.65) & (ratio < 1.5)), ratio


def test_unused_parameters_count_as_zero():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.unused = nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    net = Branchy()
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    res = hutchinson_traces(net, None, batches, target_rel_se=0.2, max_probes=400, method="loop")
    assert res.groups["unused"].trace_per_param == 0.0 and res.groups["unused"].converged
    assert res.groups["used"].trace_per_param > 0


def test_no_trainable_parameters_is_a_clear_error():
    net = tiny_net().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        hutchinson_traces(net, None, tiny_batches())


def test_non_finite_loss_is_a_clear_error():
    net = tiny_net()
    with torch.no_grad():
        net[7].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="loss on batch 0 is nan"):
        hutchinson_traces(net, None, tiny_batches(), method="loop")


def test_probe_cap_warns_with_achieved_se():
    net = tiny_net()
    with pytest.warns(HessianConvergenceWarning, match=r"probe cap \(max_probes=32\).*achieved rel SE: \w+ \d"):
        res = hutchinson_traces(net, None, tiny_batches(), tiny_groups(net), target_rel_se=0.001, max_probes=32,
                                min_probes=8, method="loop")
    assert not res.converged
    assert all(g.n_probes == 32 and g.rel_se > 0.001 for g in res.groups.values())


def test_model_state_is_restored():
    model = build_model(Arch.from_space(load_space("fmnist"), ["ir_k3_e1", "skip", "skip", "ir_k3_e3",
                                                               "shuffle_k3", "sqnxt_k3"], 4, 8))
    model.train()
    bn = model.layers[0].pw.bn
    stats = bn.running_mean.clone()
    batches = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))]
    with pytest.warns(HessianConvergenceWarning):
        res = hutchinson_traces(model, None, batches, target_rel_se=0.5, max_probes=8, min_probes=4, method="loop")
    assert model.training and bn.training and torch.equal(bn.running_mean, stats)
    assert model.layers[0].pw.conv.bit_state.enabled
    assert list(res.groups) == ["stem"] + [f"layers.{i}" for i in range(6)] + ["head"]
    assert res.groups["layers.2"].n_params == 0  # 'skip' at stride 1, same channels: identity
    assert res.groups["layers.1"].n_params == 16 * 24  # 'skip' at stride 2: a 1x1 conv
    assert res.groups["layers.0"].n_params == sum(w.numel() for w in child_groups(model)["layers.0"])


def test_omega_is_trace_times_quantization_error():
    torch.manual_seed(0)
    ws = [torch.randn(8, 4, 3, 3), torch.randn(16, 8, 1, 1)]
    err = {b: sum(quant_error_sq(w, b).item() for w in ws) for b in (2, 4, 8)}
    assert quant_error(ws, 4) == pytest.approx(err[4])
    assert omega(0.5, ws, 2) == pytest.approx(0.5 * err[2])
    table = omega_table(0.5, ws, (2, 4, 8))
    assert table[2] > table[4] > table[8] > 0

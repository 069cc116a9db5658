"""The trace-weighted quantization penalty of the search, and per-op traces of a supernet."""
import warnings

import pytest
import torch

from fbnas.hessian import HessianConvergenceWarning, HessianPenalty, QuantErrorBank, omega, supernet_traces
from fbnas.hessian.groups import quantized_weights
from fbnas.quant.fake import quant_error_sq
from fbnas.space import space_from_dict
from fbnas.supernet import Supernet

TINY_SPACE = {
    "format": "fbnas-space/1", "name": "tiny", "input": {"channels": 1, "size": 8}, "num_classes": 3,
    "stem": {"op": "conv", "kernel": 3, "channels": 4, "stride": 1},
    "stages": [{"channels": 4, "repeats": 1, "stride": 1}, {"channels": 8, "repeats": 1, "stride": 2}],
    "head": {"channels": 16}, "candidates": ["ir_k3_e1", "ir_k3_e3", "skip"],
    "bits": {"weights": [2, 4, 8], "activations": [8]}, "fixed_bits": {"weights": 8, "activations": 8},
}




def tiny_supernet(mode: str = "soft") -> Supernet:
    torch.manual_seed(0)
    return Supernet(space_from_dict(TINY_SPACE, "tiny"), mode=mode)


def tiny_batches(n: int = 2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def refreshed(gamma: float = 0.5, mode: str = "soft") -> tuple[Supernet, HessianPenalty]:
    net = tiny_supernet(mode)
    pen = HessianPenalty(gamma, refresh_every=10, target_rel_se=0.2, max_probes=32, min_probes=8, method="loop")
    pen.refresh(net, None, tiny_batches(), step=0)
    return net, pen


def test_quant_error_bank_matches_quant_error_sq_and_its_gradient():
    torch.manual_seed(0)
    units = [[torch.randn(6, 3, 3, 3, requires_grad=True), torch.randn(4, 6, 1, 1, requires_grad=True)],
             [torch.randn(5, 1, 3, 3, requires_grad=True)]]
    bits = (1, 2, 4, 8)
    err = QuantErrorBank(units, bits)()
    ref = torch.stack([torch.stack([sum(quant_error_sq(w, b) for w in ws) for b in bits]) for ws in units])
    assert torch.allclose(err, ref, rtol=1e-5, atol=1e-6)
    coef = torch.rand(err.shape)
    g_bank = torch.autograd.grad((err * coef).sum(), units[0] + units[1])
    g_ref = torch.autograd.grad((ref * coef).sum(), units[0] + units[1])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(g_bank, g_ref))


def test_supernet_traces_cover_every_op_with_weights_and_restore_the_supernet():
    net = tiny_supernet()
    net.train()
    paths = []
    with pytest.warns(HessianConvergenceWarning):
        res = supernet_traces(net, None, tiny_batches(), target_rel_se=0.01, max_probes=16, min_probes=8,
                              method="loop", on_path=lambda done, total: paths.append((done, total)))
    assert paths == [(1, 3), (2, 3), (3, 3)]  # one call per path (a progress bar), here 3 ops per layer
    # layer 0 is 4->4 stride 1 (skip is an identity, no weights); layer 1 is 4->8 stride 2 (skip is a conv)
    assert list(res.groups) == ["mixed_layers.0.ops.0", "mixed_layers.0.ops.1", "mixed_layers.1.ops.0",
                                "mixed_layers.1.ops.1", "mixed_layers.1.ops.2"]
    for name, g in res.groups.items():
        l, i = int(name.split(".")[1]), int(name.split(".")[3])
        assert g.n_params == sum(w.numel() for w in quantized_weights(net.mixed_layers[l].ops[i]))
        assert g.n_probes == 16 and g.se > 0 and g.trace_per_param != 0.0
    assert net._fixed is None and net.training
    assert all(s.enabled for states in net.bit_states for s in states)


def test_penalty_is_zero_when_off_or_before_the_first_refresh():
    net = tiny_supernet()
    net(tiny_batches(1)[0][0])
    off = HessianPenalty(0.0)
    assert not off.should_refresh(0) and off.refresh(net, None, tiny_batches()) is None
    assert off(net).item() == 0.0
    assert HessianPenalty(1.0)(net).item() == 0.0


def test_penalty_equals_gamma_at_uniform_weights_after_refresh():
    net, pen = refreshed(gamma=0.7)
    for layer in net.mixed_layers:
        layer.last_op_weights = torch.full((3,), 1 / 3)
        layer.last_w_weights = torch.full((3, 3), 1 / 3)
    assert pen(net).item() == pytest.approx(0.7, rel=1e-5)


def test_penalty_of_a_fixed_path_is_the_sum_of_its_omegas():
    net, pen = refreshed(gamma=2.0)
    path = [(1, 0, 0), (2, 1, 0)]  # ir_k3_e3 at 2 bits, then the strided skip conv at 4 bits
    net.fix(path)
    net(tiny_batches(1)[0][0])
    expected = sum(omega(pen.traces[l, i].item(), quantized_weights(net.mixed_layers[l].ops[i]), (2, 4, 8)[w])
                   for l, (i, w, _) in enumerate(path))
    assert pen(net).item() == pytest.approx(2.0 * expected / pen.norm, rel=1e-4)


def test_penalty_gradients_reach_arch_logits_and_weights_not_traces():
    net, pen = refreshed()
    net.train()
    net(tiny_batches(1)[0][0])  # a soft Gumbel sample
    value = pen(net)
    assert value.item() > 0
    value.backward()
    layer = net.mixed_layers[1]
    assert layer.op_logits.grad is not None and layer.op_logits.grad.abs().sum() > 0
    assert layer.w_bit_logits.grad is not None and layer.w_bit_logits.grad.abs().sum() > 0
    w = layer.ops[0].pw.conv.weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert not pen.traces.requires_grad


def test_refresh_schedule_and_state_round_trip():
    net, pen = refreshed()
    pen.last_refresh_step = None  # as after a refresh at the end of warm-up without a step
    assert not pen.should_refresh(500)  # counts from here
    assert not pen.should_refresh(509) and pen.should_refresh(510)
    net(tiny_batches(1)[0][0])
    value = pen(net).item()
    fresh = HessianPenalty(0.5, refresh_every=10)
    assert fresh.should_refresh(0)
    fresh.load_state_dict(pen.state_dict())
    assert fresh(net).item() == pytest.approx(value, rel=1e-6)
    assert not fresh.should_refresh(505) and fresh.should_refresh(510)


def test_refresh_is_deterministic_and_hard_mode_works():
    _, a = refreshed(mode="hard")
    _, b = refreshed(mode="hard")
    assert torch.equal(a.traces, b.traces) and a.norm == b.norm
    assert (a.traces[0, 2] == 0) and (a.traces[0, :2] >= 0).all()  # identity skip: no weights, no trace

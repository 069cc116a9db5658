"""ILP bit allocation: optimality on a hand-checkable case, limits respected, infeasibility, Hessian file."""
import json

import pytest

from fbnas import Arch, load_space
from fbnas.errors import ConfigError
from fbnas.ilp import allocate_bits, bops_cost, read_hessian, size_cost

OPS = ["ir_k3_e1", "ir_k3_e1", "shuffle_k3", "sqnxt_k3", "ir_k3_e3", "ir_k3_e1"]


def _arch():
    return Arch.from_space(load_space("fmnist28"), OPS, 8, 8)


def _omega(sens):
    return {f"layers.{i}": {2: 16 * s, 4: 4 * s, 8: s} for i, s in enumerate(sens)}


def test_ilp_respects_bops_and_prefers_low_bits_where_insensitive():
    arch = _arch()
    limit = 0.6 * arch.bops()
    res = allocate_bits(arch, _omega([100, 1, 1, 1, 1, 100]), (2, 4, 8), (4, 8), {"bops": limit},
                        {"bops": bops_cost})
    assert res.totals["bops"] <= limit + 1e-6
    assert abs(res.arch.bops() - res.totals["bops"]) < 1e-3  # ILP costs == Arch.bops of the result
    assert res.choices[0] == (8, 8) and res.choices[5] == (8, 8)
    assert any(w < 8 for w, _ in res.choices[1:5])


def test_ilp_unconstrained_enough_keeps_8_bits_and_size_matches_arch():
    arch = _arch()
    res = allocate_bits(arch, _omega([1] * 6), (2, 4, 8), (4, 8), {"size_kb": arch.size_kb()},
                        {"size_kb": size_cost})
    assert res.choices == [(8, 8)] * 6
    assert abs(res.totals["size_kb"] - arch.size_kb()) < 1e-9


def test_ilp_infeasible_names_the_limit():
    with pytest.raises(ConfigError, match=r"infeasible: bops <= .*lowest reachable"):
        allocate_bits(_arch(), _omega([1] * 6), (2, 4, 8), (4, 8), {"bops": 1.0}, {"bops": bops_cost})


def test_read_hessian(tmp_path):
    p = tmp_path / "hessian.json"
    p.write_text(json.dumps({"format": "fbnas-hessian/1", "groups": {
        "layers.0": {"trace_per_param": 1e-3, "omega": {"2": 0.13, "4": 0.011, "8": 0.0004}}}}))
    assert read_hessian(p) == {"layers.0": {2: 0.13, 4: 0.011, 8: 0.0004}}
    p.write_text(json.dumps({"format": "nope"}))
    with pytest.raises(ConfigError, match="format"):
        read_hessian(p)


def _table(arch):
    from fbnas.latency import get_table

    return get_table(load_space(arch.space), "bitfusion")


def test_ilp_latency_limit_matches_lut_and_is_respected():
    from fbnas.ilp import ilp_arch
    from fbnas.latency import arch_latency

    arch = _arch()
    table = _table(arch)
    w8 = arch_latency(table, arch.with_bits(8, 8))
    res = ilp_arch(arch, _omega([100, 1, 1, 1, 1, 100]), (2, 4, 8), (4, 8), ratios={"latency_ms": 0.6}, table=table,
                   device="bitfusion", source="test")
    lat = arch_latency(table, res.arch)
    assert abs(res.limits["latency_ms"] - 0.6 * w8) < 1e-9
    assert abs(res.totals["latency_ms"] - lat) < 1e-9  # the ILP's per-part costs sum to the LUT latency
    assert lat <= 0.6 * w8 + 1e-9
    assert res.arch.predicted["bitfusion"]["latency_ms"] == round(lat, 6)
    assert res.arch.predicted["bops"] == res.arch.bops()
    assert res.arch.provenance["ilp"]["device"] == "bitfusion"


def test_ilp_latency_and_bops_limits_together():
    from fbnas.ilp import ilp_arch
    from fbnas.latency import arch_latency

    arch = _arch()
    table = _table(arch)
    res = ilp_arch(arch, _omega([1, 2, 3, 4, 5, 6]), (2, 4, 8), (4, 8), limits={"bops": 0.5 * arch.bops()},
                   ratios={"latency_ms": 0.8}, table=table)
    assert res.arch.bops() <= 0.5 * arch.bops() + 1e-6
    assert arch_latency(table, res.arch) <= 0.8 * arch_latency(table, arch) + 1e-9


def test_ilp_latency_limit_without_table_is_refused():
    from fbnas.ilp import ilp_arch

    with pytest.raises(ConfigError, match="latency_ms limit needs a latency table"):
        ilp_arch(_arch(), _omega([1] * 6), (2, 4, 8), (4, 8), limits={"latency_ms": 1.0})


def test_pair_keyed_sensitivity_lets_the_ilp_choose_any_w_a_pair():
    arch = _arch()
    # activations of layers 1-4 are sensitive, their weights are not: the cheap way down is low w with 8-bit a
    omega = {f"layers.{i}": {(w, a): (0.0 if i in (1, 2, 3, 4) else 100.0) * (8 // w) + (50.0 if a < 8 else 0.0)
                             for w in (2, 4, 8) for a in (4, 8)} for i in range(6)}
    limit = 0.7 * arch.bops()
    res = allocate_bits(arch, omega, (2, 4, 8), (4, 8), {"bops": limit}, {"bops": bops_cost})
    assert res.totals["bops"] <= limit + 1e-6
    assert all(a == 8 for _, a in res.choices)
    assert any(w == 2 for w, _ in res.choices[1:5]) and res.choices[0] == (8, 8)


def test_loss_sensitivity_measures_every_pair_and_restores_the_bits():
    import torch

    from fbnas.ilp import loss_sensitivity
    from fbnas.model import build_model

    torch.manual_seed(0)
    net = build_model(_arch())
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    net.train()
    net(x)  # activation ranges
    before = [m.bit_state.w_choices for m in net.modules() if hasattr(m, "bit_state")]
    om = loss_sensitivity(net, 6, (2, 4, 8), (4, 8), [(x, y)])
    assert set(om) == {f"layers.{i}" for i in range(6)}
    assert all(set(v) == {(w, a) for w in (2, 4, 8) for a in (4, 8)} for v in om.values())
    assert all(v[(8, 8)] == 0.0 and min(v.values()) >= 0.0 for v in om.values())
    assert max(om["layers.0"].values()) > 0.0
    assert [m.bit_state.w_choices for m in net.modules() if hasattr(m, "bit_state")] == before

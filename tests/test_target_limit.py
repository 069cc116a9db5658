"""objective.kind=target: a limit under the space's fastest network on the device is a one-line error naming the
field and the feasible range; over its slowest, a warning; a search that ends over its limit says so."""
import itertools
import json
import logging
import math

import pytest
import torch

from fbnas.cli import main
from fbnas.derive import argmax_within_limit, choice_latency, layer_options, most_probable_within
from fbnas.errors import ConfigError
from fbnas.latency import build_table, load_device
from fbnas.latency.lookup import check_target_limit, fixed_latency, latency_matrix, latency_range

TINY = ["epochs=1", "warmup_epochs=0", "max_steps_per_epoch=2", "data.name=synthetic", "data.synthetic_size=256",
        "data.batch_size=32", "data.eval_batch_size=64", "derive.eval_batches=1", "progress=false", "threads=1",
        "report=false", "objective.kind=target"]


def _range(space, device="sd835"):
    space = load_device(device).search_space(space)  # the bit pairs the device runs, as the search offers
    table = build_table(space, device)
    return latency_range(latency_matrix(table, space), fixed_latency(table, space))


def test_latency_range_takes_the_cheapest_and_dearest_choice_per_layer():
    m = torch.tensor([[[[1.0, 2.0]], [[0.5, 4.0]]], [[[3.0, 3.0]], [[2.0, 9.0]]]])  # [L=2, ops=2, w=1, a=2]
    assert latency_range(m, 0.25) == (0.5 + 2.0 + 0.25, 4.0 + 9.0 + 0.25)
    with pytest.raises(ConfigError, match=r"^field 'objective.limit_ms' is 2 ms, under the fastest network of "
                                          r"here \(2.75 ms\); the networks of this space there take 2.75 to 13.25 ms$"):
        check_target_limit("target", 2.0, m, 0.25, "here")
    check_target_limit("multiplicative", 2.0, m, 0.25, "here")  # other kinds have no limit


def test_a_limit_over_the_slowest_network_warns(fmnist, caplog):
    table = build_table(fmnist, "sd835")
    lo, hi = latency_range(latency_matrix(table, fmnist), fixed_latency(table, fmnist))
    with caplog.at_level(logging.WARNING, logger="fbnas"):
        check_target_limit("target", hi * 2, latency_matrix(table, fmnist), fixed_latency(table, fmnist), "x")
    assert "never binds" in caplog.text and f"{hi:.4g} ms" in caplog.text


def test_search_refuses_an_unreachable_limit_and_warns_when_it_ends_over_it(fmnist, tmp_path, capsys):
    lo, hi = _range(fmnist)
    bad = tmp_path / "bad"
    assert main(["search", *TINY, f"objective.limit_ms={lo / 2}", f"hydra.run.dir={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fbnas: error: field 'objective.limit_ms'") and f"{lo:.4g} to {hi:.4g} ms" in err
    assert "\n" not in err and not bad.exists()
    limit = lo * 1.0001  # only the fastest networks fit: a 2-step search's argmax is far over it
    assert main(["search", *TINY, f"objective.limit_ms={limit}", f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    assert "over objective.limit_ms=" not in capsys.readouterr().err
    arch = json.loads((tmp_path / "run" / "arch.json").read_text())
    assert lo <= arch["predicted"]["sd835"]["latency_ms"] <= limit


def _brute_force(options, budget):
    best, best_logp = None, -math.inf
    for combo in itertools.product(*(range(len(c)) for c, _, _ in options)):
        cost = sum(opt[2][k] for opt, k in zip(options, combo))
        logp = sum(opt[1][k] for opt, k in zip(options, combo))
        if cost <= budget and logp > best_logp:
            best, best_logp = [opt[0][k] for opt, k in zip(options, combo)], logp
    return best


def test_the_most_probable_architecture_within_a_limit_matches_enumeration():
    gen = torch.Generator().manual_seed(0)
    L, n_ops, n_w, n_a = 3, 3, 2, 2
    ops = torch.softmax(torch.randn(L, n_ops, generator=gen) * 2, -1)
    ws = torch.softmax(torch.randn(L, n_ops, n_w, generator=gen), -1)
    as_ = torch.softmax(torch.randn(L, n_ops, n_a, generator=gen), -1)
    has_bits = torch.tensor([[True, True, False]] * L)  # the third op is a skip: one option
    lat = torch.rand(L, n_ops, n_w, n_a, generator=gen) + 0.1
    lat[:, 2] = 0.05
    lat[0, 1, 1, 1] = float("inf")  # a bit pair the device does not run
    options = layer_options(ops, ws, as_, has_bits, lat)
    assert [len(c) for c, _, _ in options] == [8, 9, 9]
    lo = sum(min(c) for _, _, c in options)
    for budget in (lo, lo + 0.3, lo + 0.8, lo + 5.0):
        got = most_probable_within(options, budget)
        assert got == _brute_force(options, budget + 1e-9)
        assert choice_latency(got, lat) <= budget + 1e-9
    assert most_probable_within(options, lo * 0.99) is None


def test_an_argmax_within_the_limit_is_derived_unchanged_and_one_over_it_is_repaired():
    ops = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    ws = torch.tensor([[[0.9, 0.1], [0.5, 0.5]], [[0.8, 0.2], [0.5, 0.5]]])
    as_ = torch.ones(2, 2, 1)
    has_bits = torch.tensor([[True, False], [True, False]])
    lat = torch.tensor([[[[1.0], [0.6]], [[0.1], [0.1]]], [[[1.0], [0.6]], [[0.1], [0.1]]]])  # [L, ops, w, a]
    argmax = [(0, 0, 0), (0, 0, 0)]
    probs = (ops, ws, as_)
    assert argmax_within_limit(argmax, probs, has_bits, lat, 0.5, limit_ms=2.5) == argmax
    # 1.6 ms for the layers: one of them to 4 bits; layer 1's 8-bit option is the less certain (0.8 vs 0.9)
    assert argmax_within_limit(argmax, probs, has_bits, lat, 0.5, limit_ms=2.1) == [(0, 0, 0), (0, 1, 0)]
    assert argmax_within_limit(argmax, probs, has_bits, lat, 0.5, limit_ms=0.75) == [(1, 0, 0), (1, 0, 0)]

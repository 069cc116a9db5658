"""objective.kind=target: a limit under the space's fastest network on the device is a one-line error naming the
field and the feasible range; over its slowest, a warning; a search that ends over its limit says so."""
import logging

import pytest
import torch

from fbnas.cli import main
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
    assert main(["search", *TINY, f"objective.limit_ms={lo * 1.0001}", f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    err = capsys.readouterr().err
    assert "fbnas: warning: the found architecture takes" in err and "over objective.limit_ms=" in err

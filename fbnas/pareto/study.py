"""run_pareto: collect the searched networks, generate the baselines, train every network with one recipe
and several seeds (resumable, parallel), and write pareto.json / pareto.md / pareto.png."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import ParetoConfig
from ..errors import ConfigError
from ..io import atomic_write_json
from ..latency import arch_latency, get_table, load_device
from ..space import load_space
from .jobs import Job, JobStats, _dataset, run_jobs
from .networks import (Network, budget_label, handcrafted_networks, mbv2_reference_ms, parse_baselines, random_networks,
                       search_networks, uniform_bit_networks)
from .report import hardware, make_record, write_outputs

log = logging.getLogger("fbnas")
BUDGET_UNITS = ("ms", "mbv2")


@dataclass
class ParetoResult:
    records: list[dict]
    stats: JobStats
    out_dir: Path


def _check(cfg: ParetoConfig) -> None:
    if cfg.budget_unit not in BUDGET_UNITS:
        raise ConfigError(f"field 'budget_unit' is {cfg.budget_unit!r}; use ms or mbv2")
    if any(not b > 0 for b in cfg.budgets):
        raise ConfigError(f"field 'budgets' must hold positive numbers, got {list(cfg.budgets)}")
    if not 0 < cfg.budget_tolerance < 1:
        raise ConfigError(f"field 'budget_tolerance' must be in (0, 1), got {cfg.budget_tolerance}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"field 'seeds' must be a non-empty list of distinct training seeds, got {list(cfg.seeds)}")
    if cfg.train.seed != 0:
        raise ConfigError("field 'train.seed' is not used by fbnas pareto; set the training seeds with 'seeds'")
    if cfg.train.init != "scratch":
        raise ConfigError("fbnas pareto trains every network from scratch with one recipe; leave 'train.init' at "
                          "scratch")
    cfg.train.check()


def collect_networks(cfg: ParetoConfig, space, table, runnable=None) -> tuple[list[Network], list[tuple[float, str]],
                                                                              float | None]:
    """(networks, [(budget ms, label)], MobileNetV2-like W8A8 latency or None)."""
    n_random, hand, uniform = parse_baselines(cfg.baselines)
    mbv2_ms = None
    if cfg.budget_unit == "mbv2" or hand:
        try:
            mbv2_ms = mbv2_reference_ms(space, table)
        except ConfigError:
            if cfg.budget_unit == "mbv2":
                raise
    if cfg.budget_unit == "mbv2":
        budgets = [(f * mbv2_ms, f"{f:.2f}x") for f in cfg.budgets]
    else:
        budgets = [(float(b), f"{b:.4g}ms") for b in cfg.budgets]
    found = search_networks(cfg.runs, space, dict(budgets))
    if not budgets:  # the budgets the searches were given
        budgets = [(b, f"{b:.4g}ms") for b in sorted({n.budget_ms for n in found if n.budget_ms is not None})]
    if n_random and not budgets:
        raise ConfigError("baseline random:N needs latency budgets: set budgets=[...] (budget_unit=ms or mbv2) or "
                          "give search runs made with objective.kind=target")
    nets = list(found)
    if uniform:
        nets += uniform_bit_networks(found, space)
    if hand:
        nets += handcrafted_networks(space)
    for i, (b_ms, label) in enumerate(budgets if n_random else []):
        nets += random_networks(runnable or space, table, n_random, b_ms, label, cfg.random_seed, i,
                                cfg.budget_tolerance, cfg.random_max_tries)
    if not nets:
        raise ConfigError("nothing to train: give search runs (runs=[...]) or baselines (baselines=[random:12,"
                          "handcrafted])")
    return nets, budgets, mbv2_ms


def run_pareto(cfg: ParetoConfig, out_dir: str | Path, command: str = "") -> ParetoResult:
    from ..data import check_matches_space

    _check(cfg)
    out_dir = Path(out_dir)
    space = load_space(cfg.space)
    device = load_device(cfg.device_file or cfg.device)
    table = get_table(space, device, cfg.lut)
    # random nets draw the bits the device runs, as the search does (sd835: W8A8)
    runnable = device.search_space(space)
    nets, budgets, mbv2_ms = collect_networks(cfg, space, table, runnable)
    check_matches_space(_dataset(cfg.data, nets[0].arch), space.in_channels, space.input_size, space.num_classes,
                        space.name)
    for net in nets:
        if net.arch_path is None:  # relative to out_dir
            net.arch_path = f"archs/{net.name}.json"
            atomic_write_json(out_dir / net.arch_path, net.arch.to_dict())
    jobs, seen = [], set()
    for net in nets:
        if net.arch_id not in seen:
            seen.add(net.arch_id)
            jobs += [Job(net.arch_id, net.name, net.arch.to_dict(), seed) for seed in cfg.seeds]
    log.info("%d networks (%d distinct) x %d seeds = %d trainings in %s", len(nets), len(seen), len(cfg.seeds),
             len(jobs), out_dir)
    results, stats = run_jobs(jobs, cfg.train, cfg.data, out_dir, cfg.workers, cfg.threads, cfg.progress)
    labels = dict(budgets)
    records = [make_record(net, device.name, arch_latency(table, net.arch),
                           [results[f"{net.arch_id}__seed{s}"] for s in cfg.seeds],
                           budget_label(net.budget_ms, labels) if net.budget_ms is not None else None)
               for net in nets]
    s = cfg.train
    header = {"command": command or "run_pareto(...)", "hardware": hardware(s.accelerator), "space": space.name,
              "device": f"{device.name} (latency table: {table.path or 'built in memory'})",
              "MobileNetV2-like W8A8 latency": f"{mbv2_ms:.4g} ms" if mbv2_ms else "n/a",
              "recipe": f"fbnas train: QAT {s.epochs} epochs + {s.fold_epochs} BN-folded, batch {s.batch_size}, "
                        f"lr {s.lr}, steps/epoch {s.max_steps_per_epoch or 'all'}, act_clip {s.act_clip}, "
                        f"integer-only evaluation",
              "data": ", ".join(f"{k}={v}" for k, v in asdict(cfg.data).items()),
              "seeds": list(cfg.seeds),
              "trainings": f"{stats.total} ({stats.skipped} reused from earlier runs of this directory)"}
    write_outputs(out_dir, records, budgets, header)
    return ParetoResult(records, stats, out_dir)

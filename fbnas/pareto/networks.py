"""The networks of a Pareto study: searched architectures read from runs, and the baselines generated in the
space (random nets at a latency budget, hand-designed members, the found nets at uniform bits)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..arch import Arch, load_arch
from ..errors import ConfigError
from ..io import read_jsonl
from ..latency import arch_latency, fixed_latency, latency_matrix
from ..latency.table import LatencyTable
from ..space import SearchSpace
from ..supernet import resolved_anchor_steps

FAMILIES = ("search", "uniform_bits", "handcrafted", "random")
# (name, op used in every searchable layer): the hand-designed networks a space can express
HANDCRAFTED = (("mbv2", "ir_k3_e6"), ("shufflenetv2", "shuffle_k3"), ("squeezenext", "sqnxt_k3"))
UNIFORM_BITS = ((8, 8), (4, 8))
MBV2_OP = "ir_k3_e6"


@dataclass
class Network:
    family: str
    name: str
    arch: Arch
    budget_ms: Optional[float] = None
    arch_path: Optional[str] = None  # where the arch came from (search runs); generated ones are written later
    extra: dict = field(default_factory=dict)

    @property
    def arch_id(self) -> str:
        return arch_id(self.arch)


def arch_id(arch: Arch) -> str:
    """A short content hash of what is trained: the space, the ops and bits of every layer, the fixed bits."""
    d = arch.to_dict()
    key = json.dumps([d["space"], d["input"], d["stem"], d["layers"], d["head"], d["fixed_bits"],
                      d["num_classes"]], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def bits_label(arch: Arch) -> str:
    """'W8A8' for uniform bits, else the per-layer w/a bits."""
    pairs = {(l.w_bits, l.a_bits) for l in arch.layers}
    if len(pairs) == 1:
        (w, a), = pairs
        return f"W{w}A{a}"
    return " ".join(f"{l.w_bits}/{l.a_bits}" for l in arch.layers)


# ------------------------------------------------------------------------------------------ search runs

def find_arch_files(paths: Sequence[str]) -> list[Path]:
    """arch.json of each given run: an arch.json file, a search run directory, or a directory of runs (a Hydra
    multirun), each once. A run without arch.json and a directory holding no run are errors naming the path."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif not p.is_dir():
            raise ConfigError(f"field 'runs': {p} does not exist; give search run directories, multirun "
                              "directories or arch.json files")
        elif (p / "arch.json").is_file():
            out.append(p / "arch.json")
        elif _is_run(p):
            raise ConfigError(f"field 'runs': run {p} has no arch.json (an unfinished search?); finish it with "
                              "`fbnas search ... resume=true` or leave it out")
        else:
            runs = sorted((d for d in p.iterdir() if d.is_dir() and ((d / "arch.json").is_file() or _is_run(d))),
                          key=lambda d: (len(d.name), d.name))
            if not runs:
                raise ConfigError(f"field 'runs': {p} holds no search runs (no arch.json in it or in its "
                                  "sub-directories)")
            for d in runs:
                if not (d / "arch.json").is_file():
                    raise ConfigError(f"field 'runs': run {d} has no arch.json (an unfinished search?); finish it "
                                      "with `fbnas search ... resume=true` or leave it out")
                out.append(d / "arch.json")
    unique: dict[Path, Path] = {}
    for f in out:  # a run named twice (as a run and inside its multirun) is one network
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def _is_run(d: Path) -> bool:
    return any((d / n).exists() for n in (".hydra", "metrics.jsonl", "checkpoints", "search.log"))


def search_networks(paths: Sequence[str], space: SearchSpace, budget_names: dict[float, str]) -> list[Network]:
    nets: list[Network] = []
    for f in find_arch_files(paths):
        arch = load_arch(f)
        if arch.space != space.name:
            raise ConfigError(f"{f}: the architecture is of space {arch.space!r} but field 'space' is "
                              f"{space.name!r}; set space={arch.space} or leave the run out")
        config = arch.provenance.get("config") or {}
        objective = config.get("objective") or {}
        budget = objective.get("limit_ms") if objective.get("kind") == "target" else None
        label = budget_label(budget, budget_names) if budget is not None else (f.parent.name or f.stem)
        mode = search_variant(config)  # single- and two-path searches are told apart from all-paths ones
        name = f"search_{label}" if mode == "soft" else f"search_{mode}_{label}"  # the default search: no suffix
        nets.append(Network("search", name, arch, budget, str(f),
                            {"searched_device": arch.provenance.get("device"), "search_mode": mode,
                             "search_seconds": search_seconds(f.parent / "metrics.jsonl")}))
    return _unique_names(nets)


def search_variant(config: dict) -> str:
    """A search's mode as a name: soft, hard or two_path, with _a<K> when two_path held anchors K forwards
    (a run from before anchors has none) and _s<N> when the search's seed N is not 0."""
    mode = config.get("mode", "soft")
    steps = resolved_anchor_steps(mode, config.get("anchor_steps", 1))
    seed = config.get("seed", 0)
    return mode + (f"_a{steps}" if steps > 1 else "") + (f"_s{seed}" if seed else "")


def search_seconds(metrics: Path) -> Optional[float]:
    """The summed epoch times of a search run (its metrics.jsonl), or None without one."""
    records = read_jsonl(metrics)
    return round(sum(float(r.get("seconds", 0.0)) for r in records), 1) if records else None


def budget_label(budget_ms: float, names: dict[float, str]) -> str:
    for b, name in names.items():
        if same_budget(b, budget_ms):
            return name
    return f"{budget_ms:.4g}ms"


def same_budget(a: Optional[float], b: Optional[float]) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(abs(a), abs(b))


def _unique_names(nets: list[Network]) -> list[Network]:
    seen: dict[str, int] = {}
    for n in nets:
        k = seen.get(n.name, 0) + 1
        seen[n.name] = k
        if k > 1:
            n.name = f"{n.name}_{k}"
    return nets


# ------------------------------------------------------------------------------------------- baselines

def handcrafted_networks(space: SearchSpace) -> list[Network]:
    """Every hand-designed member the space can express (its op is a candidate), at W8A8 and W4A8 where the
    space offers those bits."""
    nets = []
    for name, op in HANDCRAFTED:
        if op not in space.candidates:
            continue
        for w, a in UNIFORM_BITS:
            if w in space.w_bits and a in space.a_bits:
                nets.append(Network("handcrafted", f"{name}_W{w}A{a}", Arch.from_space(space, [op] * space.num_layers,
                                                                                      w, a)))
    return nets


def uniform_bit_networks(found: Sequence[Network], space: SearchSpace) -> list[Network]:
    """Each found net at every uniform bit-width the space offers (W8A8, W4A8), unless it already is one."""
    nets = []
    for net in found:
        for w, a in UNIFORM_BITS:
            if w not in space.w_bits or a not in space.a_bits:
                continue
            arch = net.arch.with_bits(w, a)
            if arch_id(arch) != net.arch_id:
                nets.append(Network("uniform_bits", f"{net.name}_W{w}A{a}", arch, net.budget_ms,
                                    extra={"from": net.name}))
    return nets


def mbv2_reference_ms(space: SearchSpace, table: LatencyTable) -> float:
    """Latency of the MobileNetV2-like W8A8 net (ir_k3_e6 everywhere): the unit of budget_unit=mbv2."""
    if MBV2_OP not in space.candidates or 8 not in space.w_bits or 8 not in space.a_bits:
        raise ConfigError(f"budget_unit=mbv2 needs op {MBV2_OP} and 8-bit weights and activations in space "
                          f"{space.name}; give budgets in ms (budget_unit=ms)")
    return arch_latency(table, Arch.from_space(space, [MBV2_OP] * space.num_layers, 8, 8))


def random_networks(space: SearchSpace, table: LatencyTable, n: int, budget_ms: float, label: str, seed: int,
                    index: int, tolerance: float = 0.05, max_tries: int = 200000) -> list[Network]:
    """`n` distinct architectures drawn uniformly over the ops and bits of every layer, kept when their latency
    on the table's device is within +-tolerance of budget_ms (rejection sampling, seeded by (seed, index))."""
    lut = latency_matrix(table, space).double().numpy()  # [L, ops, w_bits, a_bits]
    fixed = fixed_latency(table, space)
    n_layers, n_ops, n_w, n_a = lut.shape
    rng = np.random.default_rng([seed, index])
    layer = np.arange(n_layers)
    found: dict[tuple, float] = {}
    tries, lo, hi = 0, float("inf"), 0.0
    while len(found) < n and tries < max_tries:
        batch = min(4096, max_tries - tries)
        ops, wb, ab = (rng.integers(k, size=(batch, n_layers)) for k in (n_ops, n_w, n_a))
        lat = lut[layer, ops, wb, ab].sum(1) + fixed
        lo, hi = min(lo, float(lat.min())), max(hi, float(lat.max()))
        for i in np.flatnonzero(np.abs(lat / budget_ms - 1.0) <= tolerance):
            key = (tuple(ops[i]), tuple(wb[i]), tuple(ab[i]))
            found.setdefault(key, float(lat[i]))
            if len(found) == n:
                break
        tries += batch
    if len(found) < n:
        raise ConfigError(f"latency budget {budget_ms:.4g} ms ({label}) on {table.device}: {len(found)} of {n} random "
                          f"nets of space {space.name} within +-{tolerance:.0%} after {tries} tries (random nets "
                          f"span {lo:.4g}-{hi:.4g} ms); choose a budget inside that range or fewer random nets")
    nets = []
    for j, (ops_i, wb_i, ab_i) in enumerate(found):
        arch = Arch.from_space(space, [space.candidates[o] for o in ops_i], [space.w_bits[w] for w in wb_i],
                               [space.a_bits[a] for a in ab_i])
        nets.append(Network("random", f"random_{label}_{j:02d}", arch, budget_ms))
    return nets


def parse_baselines(specs: Sequence[str]) -> tuple[int, bool, bool]:
    """(random nets per budget, handcrafted?, uniform_bits?) from tokens random:N | handcrafted | uniform_bits."""
    n_random, hand, uniform = 0, False, False
    for spec in specs:
        spec = str(spec).strip()
        if spec.startswith("random:"):
            try:
                n_random = int(spec.split(":", 1)[1])
            except ValueError:
                n_random = -1
            if n_random <= 0:
                raise ConfigError(f"field 'baselines': {spec!r} needs a positive count, e.g. random:12")
        elif spec == "handcrafted":
            hand = True
        elif spec == "uniform_bits":
            uniform = True
        else:
            raise ConfigError(f"field 'baselines': unknown baseline {spec!r}; use random:N, handcrafted, uniform_bits")
    return n_random, hand, uniform

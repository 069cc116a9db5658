"""HAWQ-V3 bit allocation as an integer linear program over a found architecture.

One binary variable x[i, o] per searchable layer i and bit option o = (w_bits, a_bits); exactly one option per
layer. Minimise sum_i Omega_i(w_bits) subject to any of: model size (KB), bit-operations, and the latency of
a LUT on a chosen device. Omega_i(b) = (Tr(H_i)/n_i) * ||Q_b(W_i) - W_i||^2 from hessian.json (fbnas-hessian/1),
or, without traces, the weight perturbation ||Q_b(W_i) - W_i||^2 alone. Like HAWQ-V3, whose sensitivity
measures weights only, an option's activation bits follow its weight bits (`a_bits_for`, default: the smallest
activation choice >= w_bits, else the largest). `loss_sensitivity` measures Omega_i(w, a) on the loss instead,
for every (w_bits, a_bits) pair, and the ILP then chooses among all pairs. Solved exactly with
scipy.optimize.milp (HiGHS).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from .arch import Arch
from .blocks import KernelSpec
from .errors import ConfigError
from .io import read_json
from .quant.fake import quant_error_sq

HESSIAN_FORMAT = "fbnas-hessian/1"

# cost of one part at (w_bits, a_bits): part name, its kernels, bits -> cost
PartCost = Callable[[str, list, int, int], float]


@dataclass
class IlpResult:
    arch: Arch
    objective: float
    totals: dict  # constraint name -> value of the chosen allocation
    limits: dict  # constraint name -> limit
    choices: list[tuple[int, int]]  # (w_bits, a_bits) per layer
    omega: dict = field(default_factory=dict)  # layer -> {bits: omega}


def size_cost(name: str, kernels: Sequence[KernelSpec], w_bits: int, a_bits: int) -> float:
    """KB of weights at w_bits plus 32-bit biases (BN folded), as Arch.size_kb counts them."""
    return sum(k.weight_count * w_bits + k.c_out * 32 for k in kernels if k.has_weights) / 8 / 1024


def bops_cost(name: str, kernels: Sequence[KernelSpec], w_bits: int, a_bits: int) -> float:
    return float(sum(k.macs * w_bits * a_bits for k in kernels))


def latency_cost(table, arch: Arch) -> PartCost:
    """LUT latency (ms, p50) of one part of `arch` at (w_bits, a_bits): the table entry of the part's op and shape
    with those bits. Fixed parts (stem, head, pool, classifier) are priced at their fixed bits."""
    from .latency.keys import arch_signatures

    sigs = dict(arch_signatures(arch))

    def cost(name: str, kernels: Sequence[KernelSpec], w_bits: int, a_bits: int) -> float:
        return table.lookup(sigs[name].with_bits(w_bits, a_bits).key)

    return cost


LIMIT_KEYS = ("size_kb", "bops", "latency_ms")


def part_costs(arch: Arch, table=None) -> dict[str, PartCost]:
    costs: dict[str, PartCost] = {"size_kb": size_cost, "bops": bops_cost}
    if table is not None:
        costs["latency_ms"] = latency_cost(table, arch)
    return costs


def arch_totals(arch: Arch, costs: dict[str, PartCost]) -> dict[str, float]:
    """Every cost summed over the parts of `arch` at its own bits."""
    return {k: float(sum(c(name, ks, wb, ab) for name, ks, wb, ab in arch.parts())) for k, c in costs.items()}


def resolve_limits(arch: Arch, costs: dict[str, PartCost], absolute: dict[str, float],
                   ratios: dict[str, float]) -> dict[str, float]:
    """Absolute limits, plus limits given as a fraction of the W8A8 version of `arch` (key -> ratio)."""
    limits = {k: float(v) for k, v in absolute.items() if v}
    ref = arch_totals(arch.with_bits(8, 8), costs)
    for key, ratio in ratios.items():
        if ratio and key not in limits:
            limits[key] = float(ratio) * ref[key]
    missing = [k for k in limits if k not in costs]
    if missing:
        raise ConfigError(f"a {missing[0]} limit needs a latency table: give field 'device' (or 'lut')")
    return limits


def default_a_bits_for(w_choices: Sequence[int], a_choices: Sequence[int]) -> dict[int, int]:
    a_sorted = sorted(a_choices)
    return {w: next((a for a in a_sorted if a >= w), a_sorted[-1]) for w in w_choices}


# ------------------------------------------------------------------------------------------ sensitivity

def read_hessian(path: str | Path) -> dict[str, dict[int, float]]:
    """layer group -> {bits: omega} from an fbnas-hessian/1 file."""
    path = Path(path)
    raw = read_json(path, "Hessian trace file not found (field 'hessian')")
    if not isinstance(raw, dict) or raw.get("format") != HESSIAN_FORMAT:
        raise ConfigError(f"{path}: field 'format' is {raw.get('format') if isinstance(raw, dict) else None!r}; "
                          f"expected {HESSIAN_FORMAT!r}")
    groups = raw.get("groups")
    if not isinstance(groups, dict):
        raise ConfigError(f"{path}: field 'groups' must be an object of layer groups")
    out = {}
    for name, g in groups.items():
        om = g.get("omega") if isinstance(g, dict) else None
        if not isinstance(om, dict):
            raise ConfigError(f"{path}: field 'groups.{name}.omega' must map bit-widths to numbers")
        try:
            out[name] = {int(b): float(v) for b, v in om.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: field 'groups.{name}.omega' must map bit-widths to numbers") from None
    return out


def weight_perturbation(model: torch.nn.Module, n_layers: int, bits: Sequence[int]) -> dict[str, dict[int, float]]:
    """Omega without traces: sum over layer i's conv/linear weights of ||Q_b(W) - W||^2.

    Works on an FbnasNet (`layers.{i}.*.weight` of convs) or a FoldedNet (`nodes.layers/{i}/...weight`)."""
    out: dict[str, dict[int, float]] = {}
    params = dict(model.named_parameters())
    for i in range(n_layers):
        prefixes = (f"layers.{i}.", f"nodes.layers/{i}/")
        ws = [p for n, p in params.items() if n.startswith(prefixes) and n.endswith("weight") and p.dim() > 1]
        with torch.no_grad():
            out[f"layers.{i}"] = {b: float(sum(quant_error_sq(w, b) for w in ws)) if ws else 0.0 for b in bits}
    return out


@torch.no_grad()
def loss_sensitivity(model: torch.nn.Module, n_layers: int, w_choices: Sequence[int], a_choices: Sequence[int],
                     batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict[tuple[int, int], float]]:
    """Omega measured on the loss: for layer i and option (w, a), the rise in mean cross-entropy on `batches`
    when only layer i of an unfolded fake-quant FbnasNet (e.g. the trained W8A8 model) runs at (w, a). Unlike
    the weight-only HAWQ measure it sees activation bits too, so the ILP may pick any (w, a) pair; like HAWQ's
    it assumes the layers' losses add up. Clamped at 0 (a lower loss is noise, not a gain)."""
    import torch.nn.functional as F

    model.eval()

    def mean_ce() -> float:
        return sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in batches) / sum(len(y) for _, y in batches)

    base = mean_ce()
    out: dict[str, dict[tuple[int, int], float]] = {}
    for i in range(n_layers):
        state = _layer_bit_state(model, i)
        saved = (state.w_choices, state.a_choices)
        out[f"layers.{i}"] = {}
        try:
            for w in w_choices:
                for a in a_choices:
                    state.w_choices, state.a_choices = (int(w),), (int(a),)
                    out[f"layers.{i}"][(int(w), int(a))] = max(mean_ce() - base, 0.0)
        finally:
            state.w_choices, state.a_choices = saved
    return out


def _layer_bit_state(model: torch.nn.Module, i: int):
    from .quant.fake import bit_states

    states = bit_states(model.layers[i])
    if len(states) != 1:
        raise ConfigError(f"layers.{i} has {len(states)} bit states; loss_sensitivity needs an FbnasNet layer")
    return states[0]


# ------------------------------------------------------------------------------------------------ ILP

def allocate_bits(arch: Arch, omega: dict[str, dict[int, float]], w_choices: Sequence[int],
                  a_choices: Sequence[int], limits: dict[str, float], costs: dict[str, PartCost],
                  a_bits_for: Optional[dict[int, int]] = None) -> IlpResult:
    """Solve the ILP. `limits`/`costs` share keys (e.g. size_kb, bops, latency_ms); a cost is summed over every
    part of the network (fixed parts at their fixed bits count as constants)."""
    if not limits:
        raise ConfigError("the ILP needs at least one limit (size_kb, bops or latency_ms, absolute or *_ratio)")
    pair_keyed = all(isinstance(k, tuple) for om in omega.values() for k in om)
    if pair_keyed:  # a sensitivity per (w_bits, a_bits) option, e.g. loss_sensitivity: every pair is an option
        options = sorted({(w, a) for w in w_choices for a in a_choices})
    else:
        a_map = a_bits_for or default_a_bits_for(w_choices, a_choices)
        options = [(w, a_map[w]) for w in sorted(w_choices)]
    parts = arch.parts()
    layer_parts = {name: (ks, wb, ab) for name, ks, wb, ab in parts if name.startswith("layers.")}
    n = len(arch.layers)
    n_opt = len(options)
    c = np.zeros(n * n_opt)
    for i in range(n):
        om = omega.get(f"layers.{i}")
        if om is None:
            raise ConfigError(f"sensitivity has no group 'layers.{i}'; the Hessian file must come from this architecture")
        for o, (w, a) in enumerate(options):
            key = (w, a) if pair_keyed else w
            if key not in om:
                raise ConfigError(f"sensitivity of 'layers.{i}' has no omega for {key} bits (has {sorted(om)})")
            c[i * n_opt + o] = om[key]
    rows, lbs, ubs = [], [], []
    for i in range(n):  # one option per layer
        r = np.zeros(n * n_opt)
        r[i * n_opt:(i + 1) * n_opt] = 1
        rows.append(r), lbs.append(1), ubs.append(1)
    fixed_totals = {}
    for key, limit in limits.items():
        cost = costs[key]
        fixed = sum(cost(name, ks, wb, ab) for name, ks, wb, ab in parts if not name.startswith("layers."))
        r = np.zeros(n * n_opt)
        for i in range(n):
            ks = layer_parts[f"layers.{i}"][0]
            for o, (w, a) in enumerate(options):
                r[i * n_opt + o] = cost(f"layers.{i}", ks, w, a)
        rows.append(r), lbs.append(-np.inf), ubs.append(limit - fixed)
        fixed_totals[key] = (fixed, r)
    res = milp(c, constraints=LinearConstraint(np.array(rows), np.array(lbs), np.array(ubs)),
               integrality=np.ones(n * n_opt), bounds=Bounds(0, 1))
    if res.status != 0 or res.x is None:
        lows = {k: fixed + sum(min(r[i * n_opt:(i + 1) * n_opt]) for i in range(n))
                for k, (fixed, r) in fixed_totals.items()}
        bad = [f"{k} <= {limits[k]:.6g} (lowest reachable {lows[k]:.6g})" for k in limits if lows[k] > limits[k]]
        detail = "; ".join(bad) if bad else "the limits cannot all hold at once"
        raise ConfigError(f"the bit-allocation ILP is infeasible: {detail}; relax the limits")
    x = np.round(res.x).reshape(n, n_opt)
    choices = [options[int(np.argmax(x[i]))] for i in range(n)]
    new_arch = arch.with_bits([w for w, _ in choices], [a for _, a in choices])
    totals = {k: float(fixed + r @ np.round(res.x)) for k, (fixed, r) in fixed_totals.items()}
    return IlpResult(new_arch, float(c @ np.round(res.x)), totals, dict(limits), choices, omega)


def ilp_arch(arch: Arch, omega: dict[str, dict[int, float]], w_choices: Sequence[int], a_choices: Sequence[int],
             limits: Optional[dict[str, float]] = None, ratios: Optional[dict[str, float]] = None, table=None,
             device: str = "", source: str = "") -> IlpResult:
    """The ILP over `arch` with limits on any of size_kb / bops / latency_ms (absolute, or `ratios` of the W8A8
    version; latency needs the device's LatencyTable). The result's arch carries its predicted costs (size, BOPs,
    and the LUT latency on `device` when a table is given) and the ILP's provenance."""
    costs = part_costs(arch, table)
    lim = resolve_limits(arch, costs, limits or {}, ratios or {})
    res = allocate_bits(arch, omega, w_choices, a_choices, lim, {k: costs[k] for k in lim})
    totals = arch_totals(res.arch, costs)
    predicted = {"size_kb": round(totals["size_kb"], 3), "bops": totals["bops"], "macs": res.arch.macs(),
                 "params": res.arch.params()}
    if table is not None:
        predicted[device or table.device] = {"latency_ms": round(totals["latency_ms"], 6), "source": "lut"}
    provenance = {**arch.provenance, "ilp": {"sensitivity": source, "limits": res.limits, "objective": res.objective,
                                             "device": device or (table.device if table is not None else None),
                                             "bits": [list(c) for c in res.choices]}}
    res.arch = replace(res.arch, predicted=predicted, provenance=provenance)
    res.totals = {k: totals[k] for k in res.limits}
    return res

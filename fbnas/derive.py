"""The most probable architecture of the search distribution whose latency stays within a limit.

A search with a latency target (`objective.kind=target`) moves its multiplier by dual ascent, which oscillates
around the limit: the argmax of the logits at the end of a run can be over the limit by a few percent. The
architecture derived from such a run is, instead, the most probable one under softmax(theta) among those within
the limit: maximise sum_l log p_l(op, w_bits, a_bits) subject to sum_l latency_l(op, w_bits, a_bits) + fixed <=
limit, a multiple-choice knapsack solved exactly as an integer linear program (scipy.optimize.milp, HiGHS; a few
hundred binary variables). When the argmax is within the limit it is the answer and no program is solved.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

log = logging.getLogger(__name__)

Choice = tuple[int, int, int]  # (op, weight-bit, activation-bit) indices of one layer
PROB_FLOOR = 1e-12  # log(0) would forbid an option outright; a floor keeps it priced as very improbable


def layer_options(ops: torch.Tensor, ws: torch.Tensor, as_: torch.Tensor, has_bits: torch.Tensor,
                  latency: torch.Tensor) -> list[tuple[list[Choice], np.ndarray, np.ndarray]]:
    """Per layer: its (op, w, a) options, their log-probabilities and latencies (ms). An op without bits has
    one option, at the bit indices the argmax derivation gives it (its bits change nothing). Options with a
    non-finite latency (bit pairs the device does not run) are left out."""
    out = []
    for l in range(ops.shape[0]):
        choices, logp, cost = [], [], []
        for i in range(ops.shape[1]):
            if has_bits[l, i]:
                pairs = [(w, a) for w in range(ws.shape[-1]) for a in range(as_.shape[-1])]
            else:
                pairs = [(int(ws[l, i].argmax()), int(as_[l, i].argmax()))]
            for w, a in pairs:
                ms = float(latency[l, i, w, a])
                if not math.isfinite(ms):
                    continue
                p = float(ops[l, i]) * (float(ws[l, i, w]) * float(as_[l, i, a]) if has_bits[l, i] else 1.0)
                choices.append((i, w, a))
                logp.append(math.log(max(p, PROB_FLOOR)))
                cost.append(ms)
        out.append((choices, np.array(logp), np.array(cost)))
    return out


def most_probable_within(options: Sequence[tuple[list[Choice], np.ndarray, np.ndarray]],
                         budget_ms: float) -> list[Choice] | None:
    """The choice per layer maximising the summed log-probability with summed latency <= budget_ms; None when
    no combination fits."""
    sizes = [len(c) for c, _, _ in options]
    if sum(min(cost) for _, _, cost in options) > budget_ms:
        return None
    n = sum(sizes)
    logp = np.concatenate([lp for _, lp, _ in options])
    cost = np.concatenate([c for _, _, c in options])
    one_per_layer = np.zeros((len(sizes), n))
    start = 0
    for l, size in enumerate(sizes):
        one_per_layer[l, start:start + size] = 1.0
        start += size
    constraints = [LinearConstraint(one_per_layer, 1.0, 1.0),
                   LinearConstraint(cost[None, :], -np.inf, budget_ms + 1e-9)]
    res = milp(-logp, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1))
    if res.x is None:
        return None
    picked = np.round(res.x).astype(bool)
    out, start = [], 0
    for (choices, _, _), size in zip(options, sizes):
        out.append(choices[int(np.flatnonzero(picked[start:start + size])[0])])
        start += size
    return out


def choice_latency(choice: Sequence[Choice], latency: torch.Tensor) -> float:
    return float(sum(float(latency[l, i, w, a]) for l, (i, w, a) in enumerate(choice)))


def argmax_within_limit(argmax: list[Choice], probs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                        has_bits: torch.Tensor, latency: torch.Tensor, fixed_ms: float,
                        limit_ms: float) -> list[Choice]:
    """`argmax` when its latency is within limit_ms, else the most probable architecture within it (the fastest
    network of the space, with a warning, when even that one is over)."""
    latency = latency.detach().double().cpu()
    budget = limit_ms - fixed_ms
    if choice_latency(argmax, latency) <= budget + 1e-9:
        return argmax
    ops, ws, as_ = (t.detach().double().cpu() for t in probs)
    options = layer_options(ops, ws, as_, has_bits.cpu(), latency)
    within = most_probable_within(options, budget)
    if within is None:
        log.warning("no architecture of the space is within objective.limit_ms=%g ms: deriving the fastest", limit_ms)
        return [choices[int(np.argmin(cost))] for choices, _, cost in options]
    log.info("derive: the argmax (%.4f ms) is over the limit %g ms; the most probable architecture within it "
             "takes %.4f ms", choice_latency(argmax, latency) + fixed_ms, limit_ms,
             choice_latency(within, latency) + fixed_ms)
    return within

"""Latency of a space's choices and of whole architectures, from a LatencyTable. Missing keys fail loudly
(listing them and how to build a covering table), never silently as zero."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..arch import Arch
from ..errors import ConfigError
from ..space import SearchSpace
from .keys import arch_keys, space_fixed_signatures
from .table import LatencyTable

log = logging.getLogger("fbnas")


def latency_matrix(table: LatencyTable, space: SearchSpace) -> torch.Tensor:
    """[n_layers, n_ops, n_wbits, n_abits] float32 ms; ops in space.candidates order, bits sorted as in
    space.w_bits / space.a_bits."""
    layers = space.layers()
    keys = [[[[_layer_key(layer, op, wb, ab) for ab in space.a_bits] for wb in space.w_bits]
             for op in space.candidates] for layer in layers]
    flat = [k for per_layer in keys for per_op in per_layer for per_w in per_op for k in per_w]
    table.require(flat, space.name)
    values = [table.entries[k].p50 for k in flat]
    return torch.tensor(values, dtype=torch.float32).reshape(
        len(layers), len(space.candidates), len(space.w_bits), len(space.a_bits))


def _layer_key(layer, op: str, w_bits: int, a_bits: int) -> str:
    from .keys import op_key

    return op_key(op, layer.h_in, layer.w_in, layer.c_in, layer.c_out, layer.stride, w_bits, a_bits)


def fixed_latency(table: LatencyTable, space: SearchSpace) -> float:
    """ms of the parts every architecture of the space has: stem, head, pool, classifier."""
    keys = [sig.key for _, sig in space_fixed_signatures(space)]
    return float(sum(table.lookup_many(keys)))


def arch_latency(table: LatencyTable, arch: Arch) -> float:
    """Whole-model latency in ms: the sum of the table's p50 over every part of the architecture."""
    return float(sum(table.lookup_many(arch_keys(arch))))


def arch_breakdown(table: LatencyTable, arch: Arch) -> list[tuple[str, str, float]]:
    """(part, key, ms) for every part, in network order."""
    from .keys import arch_signatures

    sigs = arch_signatures(arch)
    table.require([s.key for _, s in sigs], arch.space or None)
    return [(part, sig.key, table.entries[sig.key].p50) for part, sig in sigs]


def latency_range(matrix: torch.Tensor, fixed_ms: float) -> tuple[float, float]:
    """(fastest, slowest) whole-network latency a space offers: per layer the cheapest (dearest) op and bits of a
    latency matrix [L, ops, w bits, a bits], plus the fixed parts."""
    per_layer = matrix.reshape(matrix.shape[0], -1).double()
    return float(per_layer.min(1).values.sum()) + fixed_ms, float(per_layer.max(1).values.sum()) + fixed_ms


def check_target_limit(kind: str, limit_ms: Optional[float], matrix: torch.Tensor, fixed_ms: float,
                       where: str) -> None:
    """objective.kind=target: a limit under the space's fastest network on the device can never be met (one-line
    error naming the feasible range); one at or over its slowest network never binds (a warning)."""
    if kind != "target" or limit_ms is None:
        return
    lo, hi = latency_range(matrix, fixed_ms)
    if limit_ms < lo:
        raise ConfigError(f"field 'objective.limit_ms' is {limit_ms:g} ms, under the fastest network of {where} "
                          f"({lo:.4g} ms); the networks of this space there take {lo:.4g} to {hi:.4g} ms")
    if limit_ms >= hi:
        log.warning("objective.limit_ms=%g ms is at or over the slowest network of %s (%.4g ms; the range is "
                    "%.4g to %.4g ms): the limit never binds", limit_ms, where, hi, lo, hi)

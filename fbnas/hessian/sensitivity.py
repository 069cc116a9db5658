"""HAWQ-V2 sensitivity: Omega_g(b) = Tr(H_g)/n_g * ||Q_b(W_g) - W_g||^2, summed over the group's weights."""
from __future__ import annotations

from typing import Sequence

import torch

from ..quant.fake import quant_error_sq


def quant_error(weights: Sequence[torch.Tensor], bits: int) -> float:
    """||Q_b(W) - W||^2 summed over weight tensors (per-output-channel symmetric quantization)."""
    with torch.no_grad():
        return float(sum(quant_error_sq(w.detach().float(), int(bits)).item() for w in weights))


def omega(trace_per_param: float, weights: Sequence[torch.Tensor], bits: int) -> float:
    return float(trace_per_param) * quant_error(weights, bits)


def omega_table(trace_per_param: float, weights: Sequence[torch.Tensor], bits: Sequence[int]) -> dict[int, float]:
    return {int(b): omega(trace_per_param, weights, b) for b in bits}

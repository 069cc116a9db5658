"""The latency table of one (space, device) as the tensors a search uses."""
from __future__ import annotations

from typing import Any, Optional

import torch

from .arch import Arch
from .resume import tensor_fingerprint
from .space import SearchSpace
from .supernet import expected_cost


class LatencyModel:
    """The latency table of one (space, device) as tensors: per-layer [L, n_ops, n_wb, n_ab] plus fixed parts."""

    def __init__(self, space: SearchSpace, device: Any, lut_path: Optional[str]):
        from .latency import fixed_latency, get_table, latency_matrix, load_device

        self.device = load_device(device)
        self.table = get_table(space, self.device, lut_path)
        self.matrix = latency_matrix(self.table, space)
        self.fixed_ms = float(fixed_latency(self.table, space))
        self.device_name = self.device.name
        self.path = getattr(self.table, "path", None)

    def fingerprint(self) -> str:
        """Of the numbers the search uses (per-layer matrix and fixed part), whatever file they came from."""
        return tensor_fingerprint(self.matrix, torch.tensor(self.fixed_ms, dtype=torch.float64))

    def of_arch(self, arch: Arch) -> float:
        from .latency import arch_latency

        return float(arch_latency(self.table, arch))

    def uniform_ms(self, has_bits: torch.Tensor) -> float:
        """E[LAT] when every op and every bit choice is equally likely (the default reference)."""
        L, n_ops, n_wb, n_ab = self.matrix.shape
        ops = torch.full((L, n_ops), 1.0 / n_ops, dtype=torch.float64)
        ws = torch.full((L, n_ops, n_wb), 1.0 / n_wb, dtype=torch.float64)
        as_ = torch.full((L, n_ops, n_ab), 1.0 / n_ab, dtype=torch.float64)
        return float(expected_cost(self.matrix.double(), ops, ws, as_)) + self.fixed_ms

"""Bit choices of a quantized op and the integer ranges they give, and device constants cached once.

A `BitState` is shared by every conv of one candidate op. It holds the bit options and, during a search, either
their mixing weights (soft) or the sampled option (hard).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

EPS = 1e-8  # the smallest scale


@dataclass(eq=False)
class BitState:
    """Bit options of one op and, during search, their current mixing weights.

    w_probs / a_probs: None means 'use the first (only) option'; a tensor [n] mixes the options.
    w_index / a_index: in hard mode, the sampled option, the only one computed (they take precedence over
    the probs, which then hold the straight-through one-hot for inspection).
    enabled=False turns quantization off (float model).
    """

    w_choices: tuple[int, ...]
    a_choices: tuple[int, ...]
    w_probs: Optional[torch.Tensor] = None
    a_probs: Optional[torch.Tensor] = None
    w_index: Optional[int] = None
    a_index: Optional[int] = None
    enabled: bool = True

    @classmethod
    def fixed(cls, w_bits: int, a_bits: int) -> "BitState":
        return cls((int(w_bits),), (int(a_bits),))

    @classmethod
    def float(cls) -> "BitState":
        return cls((32,), (32,), enabled=False)

    def clear(self) -> None:
        self.w_probs = self.a_probs = None
        self.w_index = self.a_index = None

    def single_w_bits(self) -> Optional[int]:
        """The one weight bit-width in use (the sampled option, or the only one), or None while options mix."""
        if self.w_index is not None:
            return self.w_choices[self.w_index]
        return self.w_choices[0] if self.w_probs is None else None

    def single_a_bits(self) -> Optional[int]:
        """The one activation bit-width in use (the sampled option, or the only one), or None while options mix."""
        if self.a_index is not None:
            return self.a_choices[self.a_index]
        return self.a_choices[0] if self.a_probs is None else None



def qmax_signed(bits: int) -> int:
    return max(2 ** (bits - 1) - 1, 1)


def act_levels(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range [lo, hi] of an activation at `bits`."""
    if signed:
        q = qmax_signed(bits)
        return -q, q
    return 0, 2 ** bits - 1


_CACHE: dict[tuple, torch.Tensor] = {}


def cached(key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The tensor made by `make` for `key`, made once (a constant: never written)."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def constant(shape: int | tuple[int, ...], value: float, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A cached tensor filled with `value` (made once per shape, value, device and dtype)."""
    return cached((shape, value, device, dtype), lambda: torch.full(
        shape if isinstance(shape, tuple) else (shape,), value, device=device, dtype=dtype))


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory, without the host waiting."""
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


def constant_vector(values: tuple[float, ...], device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A cached 1-d tensor of `values` (made once per values, device and dtype)."""
    return cached(("vector", values, device, dtype), lambda: to_device_async(torch.tensor(values, dtype=dtype), device))


def constant_matrix(rows: tuple[tuple[float, ...], ...], device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A cached 2-d tensor of `rows` (made once per rows, device and dtype)."""
    return cached(("matrix", rows, device, dtype), lambda: to_device_async(torch.tensor(rows, dtype=dtype), device))

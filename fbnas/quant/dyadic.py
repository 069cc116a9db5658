"""Dyadic numbers and rounding shared by the folded fake-quant model and the integer-only model.

A real multiplier M > 0 becomes m / 2^c with m a 31-bit integer in [2^30, 2^31) (from frexp) and
0 <= c <= 62. Integer requantization is exact int64 arithmetic: y = round(acc * m / 2^c), rounding
half to even (the default; matches onnxruntime and torch.round) or half away from zero (TVM's choice).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

MULT_BITS = 31
MAX_SHIFT = 62
ROUNDING_MODES = ("half_even", "half_away")
INT32_MAX = 2 ** 31 - 1


def check_rounding(mode: str) -> str:
    if mode not in ROUNDING_MODES:
        raise ConfigError(f"field 'rounding' is {mode!r}; choose one of {', '.join(ROUNDING_MODES)}")
    return mode


def dyadic(multiplier: torch.Tensor, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """m, c (int64 tensors, same shape) with m / 2^c the nearest 31-bit dyadic number to `multiplier`."""
    M = multiplier.detach().double()
    if bool((M <= 0).any()) or not bool(torch.isfinite(M).all()):
        raise ConfigError(f"{where}: requantization multiplier must be positive and finite, got {M.min().item()}")
    mant, exp = torch.frexp(M)  # M = mant * 2^exp, mant in [0.5, 1)
    m = torch.round(mant * 2.0 ** MULT_BITS).long()
    c = MULT_BITS - exp.long()
    carry = m == 2 ** MULT_BITS
    m = torch.where(carry, m // 2, m)
    c = torch.where(carry, c - 1, c)
    if bool((c < 0).any()):
        raise ConfigError(f"{where}: requantization multiplier {M.max().item():.3g} is too large (> 2^31): "
                          "an output range collapsed to zero; recalibrate the activation ranges")
    # very small multipliers: drop low bits of m so that the shift stays <= 62 (int64 headroom)
    excess = (c - MAX_SHIFT).clamp_min(0)
    m = round_shift(m, excess, "half_even")
    c = c - excess
    return m, c


def dyadic_value(m: torch.Tensor, c: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """m * 2^-c as a float tensor (exact in float64)."""
    return torch.ldexp(m.to(torch.float64), -c.to(torch.float64)).to(dtype)


def round_shift(p: torch.Tensor, c: torch.Tensor, mode: str) -> torch.Tensor:
    """round(p / 2^c) for int64 p and shifts c >= 0, exactly, with the given tie rule."""
    c = torch.as_tensor(c, dtype=torch.int64, device=p.device)
    one = torch.ones((), dtype=torch.int64, device=p.device)
    half = torch.where(c > 0, torch.bitwise_left_shift(one, (c - 1).clamp_min(0)), torch.zeros_like(c))
    if mode == "half_away":
        mag = torch.bitwise_right_shift(p.abs() + half, c)
        return torch.where(p < 0, -mag, mag)
    r = torch.bitwise_right_shift(p + half, c)  # floor shift: ties go up
    mask = torch.bitwise_left_shift(one, c) - 1
    tie = (torch.bitwise_and(p, mask) == half) & (c > 0)
    return torch.where(tie & (torch.bitwise_and(r, one) == 1), r - 1, r)


def round_float(z: torch.Tensor, mode: str) -> torch.Tensor:
    """The same tie rule on a float tensor (exact for |z| < 2^52 in float64)."""
    if mode == "half_away":
        return torch.sign(z) * torch.floor(z.abs() + 0.5)
    return torch.round(z)


def requantize(acc: torch.Tensor, m: torch.Tensor, c: torch.Tensor, mode: str) -> torch.Tensor:
    """round(acc * m / 2^c) in exact int64 (|acc| < 2^31 and m < 2^31, so the product fits)."""
    return round_shift(acc.to(torch.int64) * m, c, mode)

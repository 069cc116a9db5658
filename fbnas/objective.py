"""The search loss: cross-entropy combined with a latency penalty, plus (optionally) a Hessian penalty.

Latency penalties (pluggable, one registry):
- multiplicative (FBNet): CE * alpha * (log LAT / log LAT_ref)^beta. Latency is expressed in units of
  LAT_ref / e, so log(LAT_ref) = 1 and the base stays positive for any LAT > LAT_ref / e whatever the
  unit of the table (FBNet's log-of-milliseconds goes negative below 1 ms). The base is clamped at 1e-3.
- additive: CE + lambda * (LAT / LAT_ref - 1).
- target (hard limit): CE + mu * (LAT / limit - 1) with mu >= 0 updated by dual ascent after each arch
  step, mu <- max(0, mu + eta * (LAT / limit - 1)): a Lagrange multiplier that keeps E[LAT] under the limit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

PENALTIES: dict[str, Callable[..., "LatencyPenalty"]] = {}


def register_penalty(name: str):
    def deco(cls):
        PENALTIES[name] = cls
        return cls
    return deco


class LatencyPenalty:
    """Combine CE and latency into one loss. `update` is called after each architecture step."""

    name = "base"

    def __call__(self, ce: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, lat: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@register_penalty("multiplicative")
@dataclass
class MultiplicativePenalty(LatencyPenalty):
    ref_ms: float
    alpha: float = 0.2
    beta: float = 0.6
    name = "multiplicative"

    def __call__(self, ce, lat):
        base = (1.0 + torch.log(lat / self.ref_ms)).clamp_min(1e-3)
        return ce * self.alpha * base.pow(self.beta)


@register_penalty("additive")
@dataclass
class AdditivePenalty(LatencyPenalty):
    ref_ms: float
    lam: float = 0.2
    name = "additive"

    def __call__(self, ce, lat):
        return ce + self.lam * (lat / self.ref_ms - 1.0)


@register_penalty("target")
@dataclass
class TargetPenalty(LatencyPenalty):
    limit_ms: float
    ref_ms: float = 1.0
    eta: float = 0.05
    mu: float = 0.0
    name = "target"

    def __call__(self, ce, lat):
        return ce + self.mu * (lat / self.limit_ms - 1.0)

    def update(self, lat: float) -> None:
        self.mu = max(0.0, self.mu + self.eta * (lat / self.limit_ms - 1.0))

    def state_dict(self) -> dict:
        return {"mu": self.mu}

    def load_state_dict(self, state: dict) -> None:
        self.mu = float(state.get("mu", 0.0))


def make_penalty(kind: str, ref_ms: float, alpha: float = 0.2, beta: float = 0.6, lam: float = 0.2,
                 limit_ms: Optional[float] = None, eta: float = 0.05) -> LatencyPenalty:
    from .errors import ConfigError

    if kind == "multiplicative":
        return MultiplicativePenalty(ref_ms, alpha, beta)
    if kind == "additive":
        return AdditivePenalty(ref_ms, lam)
    if kind == "target":
        if limit_ms is None or not limit_ms > 0:
            raise ConfigError("field 'objective.limit_ms' must be a positive latency limit (ms) for objective.kind=target")
        return TargetPenalty(limit_ms, ref_ms, eta)
    if kind == "none":
        return AdditivePenalty(ref_ms, 0.0)
    raise ConfigError(f"field 'objective.kind' is {kind!r}; known: {', '.join(PENALTIES)}, none")

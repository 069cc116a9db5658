"""The search loss: cross-entropy combined with a latency penalty, plus (optionally) a Hessian penalty.

Latency penalties (one registry, PENALTIES; each class builds itself from the `objective` config):
- multiplicative (FBNet): CE * alpha * (log LAT / log LAT_ref)^beta. Latency is expressed in units of
  LAT_ref / e, so log(LAT_ref) = 1 and the base stays positive for any LAT > LAT_ref / e whatever the
  unit of the table (FBNet's log-of-milliseconds goes negative below 1 ms). The base is clamped at 1e-3.
- additive: CE + lambda * (LAT / LAT_ref - 1).
- target (hard limit): CE + mu * (LAT / limit - 1) with mu >= 0 updated by dual ascent after each arch
  step, mu <- max(0, mu + eta * (LAT_derived / limit - 1)): a Lagrange multiplier. Its gradient pushes the
  relaxed (expected) latency down, but the multiplier follows the latency of the network the search would
  derive now (the argmax of the logits): the expectation over a still-spread distribution is far above the
  argmax's, and a multiplier driven by it keeps growing after the derived network meets the limit, until
  every layer collapses to its cheapest op.
- none: CE alone.

A new penalty: subclass LatencyPenalty, give it `from_config(objective, ref_ms)` and decorate it with
@register_penalty("name"); `objective.kind=name` selects it and tests/test_arch_objective_data.py runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .config import ObjectiveConfig
from .errors import ConfigError
from .registry import Stateless, registrar

PENALTIES: dict[str, type["LatencyPenalty"]] = {}

Number = Union[float, torch.Tensor]


register_penalty = registrar(PENALTIES)


class LatencyPenalty(Stateless):
    """Combine CE and latency into one loss. `update` is called after each architecture step with the latency
    of the currently derived network (a device tensor: no host read)."""

    name = "base"

    @classmethod
    def from_config(cls, objective: Any, ref_ms: float) -> "LatencyPenalty":
        raise NotImplementedError

    def __call__(self, ce: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, lat: Number) -> None:
        pass

    def derive_limit_ms(self) -> Optional[float]:
        """A latency the derived architecture must stay within (ms), or None."""
        return None

    def to(self, device: torch.device) -> None:
        """Keep the state that changes during a search (e.g. a multiplier) as device tensors updated in place,
        so a captured CUDA graph that reads it sees every update."""


@register_penalty("multiplicative")
@dataclass
class MultiplicativePenalty(LatencyPenalty):
    ref_ms: float
    alpha: float = 0.2
    beta: float = 0.6

    @classmethod
    def from_config(cls, objective, ref_ms):
        return cls(ref_ms, objective.alpha, objective.beta)

    def __call__(self, ce, lat):
        base = (1.0 + torch.log(lat / self.ref_ms)).clamp_min(1e-3)
        return ce * self.alpha * base.pow(self.beta)


@register_penalty("additive")
@dataclass
class AdditivePenalty(LatencyPenalty):
    ref_ms: float
    lam: float = 0.2

    @classmethod
    def from_config(cls, objective, ref_ms):
        return cls(ref_ms, objective.lam)

    def __call__(self, ce, lat):
        return ce + self.lam * (lat / self.ref_ms - 1.0)


@register_penalty("none")
@dataclass
class NoPenalty(LatencyPenalty):
    ref_ms: float = 1.0

    @classmethod
    def from_config(cls, objective, ref_ms):
        return cls(ref_ms)

    def __call__(self, ce, lat):
        return ce + 0.0 * lat  # keeps the latency in the graph (its gradient is zero)


@register_penalty("target")
@dataclass
class TargetPenalty(LatencyPenalty):
    limit_ms: float
    ref_ms: float = 1.0
    eta: float = 0.05
    mu: Number = 0.0  # a float, or a device scalar during a search (updated without a host read)

    @classmethod
    def from_config(cls, objective, ref_ms):
        if objective.limit_ms is None or not objective.limit_ms > 0:
            raise ConfigError("field 'objective.limit_ms' must be a positive latency limit (ms) for "
                              "objective.kind=target")
        return cls(objective.limit_ms, ref_ms, objective.eta)

    def __call__(self, ce, lat):
        return ce + self.mu * (lat / self.limit_ms - 1.0)

    def derive_limit_ms(self) -> Optional[float]:
        return self.limit_ms

    def update(self, lat: Number) -> None:
        step = self.mu + self.eta * (lat / self.limit_ms - 1.0)
        if not isinstance(step, torch.Tensor):
            self.mu = max(0.0, step)
        elif isinstance(self.mu, torch.Tensor) and self.mu.device == step.device:
            self.mu.copy_(step.detach().clamp_min(0.0))  # in place (see to())
        else:
            self.mu = step.detach().clamp_min(0.0)

    def to(self, device: torch.device) -> None:
        if not (isinstance(self.mu, torch.Tensor) and self.mu.device == torch.device(device)):
            self.mu = torch.tensor(float(self.mu), device=device)

    def state_dict(self) -> dict:
        return {"mu": float(self.mu)}

    def load_state_dict(self, state: dict) -> None:
        self.mu = float(state.get("mu", 0.0))


def make_penalty(kind: str, ref_ms: float, objective: Optional[ObjectiveConfig] = None, **fields) -> LatencyPenalty:
    """The penalty `kind` from the registry, built from `objective`, or from an ObjectiveConfig of the keyword
    fields."""
    if kind not in PENALTIES:
        raise ConfigError(f"field 'objective.kind' is {kind!r}; known: {', '.join(PENALTIES)}")
    return PENALTIES[kind].from_config(objective if objective is not None else ObjectiveConfig(**fields), ref_ms)

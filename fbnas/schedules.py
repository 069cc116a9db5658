"""The Gumbel-softmax temperature schedule of a search."""
from __future__ import annotations

from typing import Optional

from .config import SearchConfig


def temperature(c: SearchConfig, epoch: int, anchor: Optional[list] = None) -> float:
    """Gumbel-softmax temperature of an epoch: tau * decay^epoch, with decay = tau_decay, or chosen so that the
    last epoch runs at tau_final. After a resume with more or fewer epochs, `anchor` = [epoch e0, tau at e0]: the
    schedule runs from there geometrically to tau_final at the new last epoch."""
    if c.tau_final is None:
        return c.tau * c.tau_decay ** epoch
    e0, tau0 = anchor if anchor is not None else (0, c.tau)
    decay = (c.tau_final / tau0) ** (1.0 / max(c.epochs - 1 - e0, 1))
    return tau0 * decay ** (epoch - e0)

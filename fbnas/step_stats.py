"""Per-step statistics of a training loop read back to the host without stalling it.

A GPU runs a step's kernels long after the host has queued them; reading a loss with `.item()` makes the host
wait until the device has caught up, so the device then idles while the host queues the next step. Here the
values of step i are stacked into one tensor whose copy to pinned host memory starts when step i has been
queued, and they are read when step i+1 has been queued: one wait per step at most, for work that is done or
nearly done, while step i+1 keeps the device busy. On a CPU the values are read at once (nothing to overlap).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

Read = tuple[dict[str, float], Any]


def copy_to_host_async(t: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
    """Start copying `t` to pinned host memory without the host waiting: (the host tensor, the event to wait on
    before reading it). A CPU tensor is cloned; no event."""
    if t.device.type != "cuda":
        return t.clone(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class StepStats:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._pending: Optional[tuple[list[str], torch.Tensor, Optional[torch.cuda.Event], Any]] = None

    def push(self, stats: dict[str, torch.Tensor], tag: Any = None) -> Optional[Read]:
        """Start reading this step's `stats` (0-dim tensors); returns the previous step's values and tag (on a
        CPU, this step's), or None."""
        keys = list(stats)
        values = torch.stack([v.detach().float().reshape(()) for v in stats.values()]) if keys else torch.zeros(0)
        if self.device.type != "cuda":
            return dict(zip(keys, values.tolist())), tag
        host, event = copy_to_host_async(values)
        previous, self._pending = self._pending, (keys, host, event, tag)
        return self._read(previous)

    def flush(self) -> Optional[Read]:
        """The values of the last pushed step not yet returned (at the end of an epoch)."""
        previous, self._pending = self._pending, None
        return self._read(previous)

    @staticmethod
    def _read(pending) -> Optional[Read]:
        if pending is None:
            return None
        keys, host, event, tag = pending
        event.synchronize()
        return dict(zip(keys, host.tolist())), tag

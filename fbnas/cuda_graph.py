"""A search step's forward, loss and gradients replayed as one CUDA graph.

An all-paths supernet step launches ~10,000 small kernels; on a fast GPU the host cannot queue them as fast as
the GPU runs them, so the step is bound by the host (bench/results/supernet_step/). When every op runs at every
step (mode soft) and the sampled bits are device data (Supernet.stage_sample), the kernels of a step are the same
at every step: they are captured once and replayed with one launch. The optimizer steps stay eager (a handful of
multi-tensor kernels), as do data copies, gradient all-reduce and clipping.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

Compute = Callable[[], tuple[dict[str, torch.Tensor], torch.Tensor]]


class GraphedGradients:
    """`compute()` -> (statistics, loss), captured with the gradients of `params` on first call and replayed
    after. compute must read its inputs from fixed tensors (copy each step's data into them) and run the same
    kernels every time; Python state it reads (a temperature, a penalty's float) is frozen into the graph, so
    make a new one when that changes. Each call replays the graph, points every param's .grad at the graph's
    gradient (None where the loss does not depend on it) and returns copies of the statistics."""

    def __init__(self, compute: Compute, params: Sequence[torch.nn.Parameter], warmup: int = 2, pool=None,
                 release: Optional[Callable[[], None]] = None):
        self.compute = compute
        self.release = release or (lambda: None)
        self.params = list(params)
        self.warmup = warmup
        self.pool = pool
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._keys: list[str] = []
        self._stats: Optional[torch.Tensor] = None
        self._grads: tuple[Optional[torch.Tensor], ...] = ()

    def _run(self) -> tuple[torch.Tensor, tuple[Optional[torch.Tensor], ...]]:
        stats, loss = self.compute()
        self._keys = list(stats)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return torch.stack([v.detach().float().reshape(()) for v in stats.values()]), grads

    def capture(self) -> None:
        """Warm up on a side stream (cuDNN autotuning, lazily made constants), then capture. Before each run
        `release` drops what compute's owner keeps of the previous forward (e.g. the sample's relaxed weights):
        while such a tensor lives, so does the autograd node that accumulates into its leaf (a logit), and that
        node keeps the stream it was made on; a backward under capture that reaches a node of the default
        stream fails ("operation would make the legacy stream depend on a capturing blocking stream")."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.release()
                self._run()
            self.release()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self._stats, self._grads = self._run()
        self.release()

    def __call__(self) -> dict[str, torch.Tensor]:
        if self.graph is None:
            self.capture()
        self.graph.replay()
        for p, g in zip(self.params, self._grads):
            p.grad = g
        return dict(zip(self._keys, self._stats.clone().unbind()))


def can_capture(device: torch.device, supernet, extra_terms: Sequence = ()) -> Optional[str]:
    """None if a search step on `device` can run as a CUDA graph; otherwise why not (for the log)."""
    if device.type != "cuda":
        return "not a CUDA device"
    if not supernet.can_stage():
        return ("mode is not soft" if supernet.paths is not None
                else "1-bit weights are quantized per conv, not in the batched kernels a graph needs")
    if extra_terms:
        return "extra loss terms (e.g. the Hessian penalty) read values on the host"
    return None

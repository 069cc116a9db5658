"""Hessian traces of a supernet's candidate ops, and the trace-weighted quantization penalty of the search.

Per-op traces (`supernet_traces`): the Hessian of op i in layer l is taken with that op *chosen* in layer l,
so Omega_{l,i}(b) is the sensitivity of the network that would use it (the soft mixture would scale an op's
curvature by its squared mixing weight and starve unlikely ops of penalty). The ops are covered by n_ops random
paths: path j runs op perm_l[j] in every layer l (a random permutation per layer), inside the supernet with
`supernet.fix(path)`, float weights and BN in eval mode; each path gives every op on it one trace estimate.

The penalty (`HessianPenalty`), HAWQ-V2 inside the search objective:

    P = gamma * sum_{l,i,b} m_{l,i} w_{l,i,b} T_{l,i} ||Q_b(W_{l,i}) - W_{l,i}||^2 / Z

m: the op weights and w: the weight-bit weights of the current forward (the same Gumbel sample, so in hard mode
the value is that of the sampled path and the gradient the straight-through one); T: trace per parameter,
clamped at 0 (a negative estimate means no measurable curvature, not a reward for quantization error), held
constant between refreshes; ||Q_b(W) - W||^2 with Q_b(W) detached, so gradients reach the conv weights
(2(W - Q_b(W))) and the op/bit probabilities, never third derivatives. Z is the same sum at uniform op and bit
weights, computed at each refresh (a constant): at a refresh the penalty of a uniform supernet equals gamma,
whatever the scale of the traces or of the weights, so gamma is scale-free.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .estimator import (DEFAULT_PROBES_PER_ROUND, GroupTrace, HessianConvergenceWarning, LossFn, TraceResult,
                        hutchinson_traces)
from .groups import quantized_weights

log = logging.getLogger("fbnas")
_EPS = 1e-8


def op_group_name(layer: int, op: int) -> str:
    return f"mixed_layers.{layer}.ops.{op}"


def supernet_traces(supernet: nn.Module, loss_fn: Optional[LossFn], batches: Sequence[Any],
                    target_rel_se: float = 0.1, max_probes: int = 64, min_probes: int = 16, seed: int = 0,
                    method: str = "auto", device: Optional[torch.device | str] = None,
                    probes_per_round: int = DEFAULT_PROBES_PER_ROUND,
                    on_path: Optional[Callable[[int, int], None]] = None) -> TraceResult:
    """Trace per parameter of every candidate op with weights, each measured on a path that chooses it.
    `on_path(done, total)` is called after each of the n_ops paths (a progress bar)."""
    layers = supernet.mixed_layers
    n_ops = max(len(layer.ops) for layer in layers)
    gen = torch.Generator().manual_seed(int(seed))
    perms = [torch.randperm(len(layer.ops), generator=gen).tolist() for layer in layers]
    merged: dict[str, GroupTrace] = {}
    n_hvp, seconds, capped = 0, 0.0, []
    engine = method
    try:
        for j in range(n_ops):
            path = [perm[j % len(perm)] for perm in perms]
            groups = {op_group_name(l, i): quantized_weights(layers[l].ops[i]) for l, i in enumerate(path)}
            groups = {k: v for k, v in groups.items() if v}
            if not groups:
                if on_path is not None:
                    on_path(j + 1, n_ops)
                continue
            supernet.fix([(i, 0, 0) for i in path])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", HessianConvergenceWarning)
                res = hutchinson_traces(supernet, loss_fn, batches, groups, target_rel_se, max_probes, min_probes,
                                        seed=int(seed) * 1009 + j, method=engine, device=device,
                                        probes_per_round=probes_per_round)
            for w in caught:
                if not issubclass(w.category, HessianConvergenceWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            engine = res.method  # time the engines once, on the first path
            merged.update(res.groups)
            n_hvp += res.n_hvp
            seconds += res.seconds
            if on_path is not None:
                on_path(j + 1, n_ops)
    finally:
        supernet.fix(None)
    order = [op_group_name(l, i) for l, layer in enumerate(layers) for i in range(len(layer.ops))]
    merged = {k: merged[k] for k in order if k in merged}
    capped = sorted(((k, g.rel_se) for k, g in merged.items() if not g.converged), key=lambda t: -t[1])
    if capped:
        worst = ", ".join(f"{k} {r:.3f}" for k, r in capped[:5])
        warnings.warn(HessianConvergenceWarning(
            f"{len(capped)} of {len(merged)} supernet ops reached the probe cap (max_probes={max_probes}) before "
            f"the target relative SE {target_rel_se:g}; achieved rel SE: {worst}{' ...' if len(capped) > 5 else ''}"),
            stacklevel=2)
    settings = {"target_rel_se": target_rel_se, "max_probes": max_probes, "min_probes": min_probes, "seed": seed,
                "batches": len(batches), "method": method, "paths": n_ops}
    return TraceResult(merged, engine, n_hvp, seconds, settings)


class QuantErrorBank:
    """||Q_b(W_u) - W_u||^2 for many units u (each a list of weight tensors) at several bit-widths at once.

    Matches fbnas.quant.fake.quant_error_sq (per-output-channel symmetric scale, Q detached) but runs as a
    handful of kernels over the concatenation of all the weights instead of a few per tensor and bit-width.
    """

    def __init__(self, units: Sequence[Sequence[torch.Tensor]], bits: Sequence[int]):
        self.weights = [w for ws in units for w in ws]
        self.bits = tuple(int(b) for b in bits)
        if not self.weights:
            raise ConfigError("QuantErrorBank needs at least one weight tensor")
        dev = self.weights[0].device
        chan_of_elem, unit_of_elem = [], []
        n_chan = 0
        for u, ws in enumerate(units):
            for w in ws:
                c = w.shape[0]
                chan_of_elem.append(torch.arange(n_chan, n_chan + c, device=dev).repeat_interleave(w.numel() // c))
                unit_of_elem.append(torch.full((w.numel(),), u, device=dev, dtype=torch.long))
                n_chan += c
        self.chan = torch.cat(chan_of_elem)
        self.unit = torch.cat(unit_of_elem)
        self.n_chan, self.n_units = n_chan, len(units)
        self.qmax = torch.tensor([max(2 ** (b - 1) - 1, 1) for b in self.bits], device=dev, dtype=torch.float32)

    def __call__(self) -> torch.Tensor:
        """[n_units, n_bits] squared quantization errors, differentiable in the weights."""
        flat = torch.cat([w.reshape(-1) for w in self.weights])
        with torch.no_grad():
            a = flat.detach().abs()
            amax = torch.zeros(self.n_chan, device=flat.device, dtype=flat.dtype).scatter_reduce(
                0, self.chan, a, "amax", include_self=False)
            qmax = self.qmax.to(flat.dtype)[:, None]
            scale = (amax[None, :] / qmax).clamp_min(_EPS)
            if 1 in self.bits:
                mean = torch.zeros(self.n_chan, device=flat.device, dtype=flat.dtype).scatter_reduce(
                    0, self.chan, a, "mean", include_self=False).clamp_min(_EPS)
                scale[self.bits.index(1)] = mean
            s = scale[:, self.chan]
            wq = torch.clamp(torch.round(flat.detach()[None] / s), -qmax, qmax) * s
            if 1 in self.bits:
                k = self.bits.index(1)
                wq[k] = torch.where(flat.detach() >= 0, 1.0, -1.0) * s[k]
        err = (flat[None] - wq).pow(2)
        out = torch.zeros(len(self.bits), self.n_units, device=flat.device, dtype=flat.dtype)
        return out.index_add(1, self.unit, err).t()


class HessianPenalty:
    """gamma * trace-weighted quantization error of the sampled ops and bits (see the module docstring)."""

    def __init__(self, gamma: float, refresh_every: int = 200, target_rel_se: float = 0.1, max_probes: int = 64,
                 batches: int = 2, min_probes: int = 16, seed: int = 0, method: str = "auto"):
        if gamma < 0 or not math.isfinite(gamma):
            raise ConfigError(f"field 'objective.hessian.gamma' must be a finite number >= 0, got {gamma}")
        if refresh_every < 1:
            raise ConfigError(f"field 'objective.hessian.refresh_every' must be >= 1, got {refresh_every}")
        if batches < 1:
            raise ConfigError(f"field 'objective.hessian.batches' must be >= 1, got {batches}")
        self.gamma, self.refresh_every = float(gamma), int(refresh_every)
        self.target_rel_se, self.max_probes, self.min_probes = target_rel_se, max_probes, min(min_probes, max_probes)
        self.batches, self.seed, self.method = int(batches), int(seed), method
        self.traces: Optional[torch.Tensor] = None  # [L, n_ops], per parameter, >= 0, zero for ops without weights
        self.se: Optional[torch.Tensor] = None
        self.norm: Optional[float] = None
        self.last_refresh_step: Optional[int] = None
        self.n_refreshes = 0
        self._seen_step: Optional[int] = None
        self._bank: Optional[QuantErrorBank] = None
        self._bank_key: Optional[tuple] = None

    @property
    def active(self) -> bool:
        return self.gamma > 0

    def should_refresh(self, step: int) -> bool:
        """True when gamma > 0 and there are no traces yet or refresh_every steps have passed since the last."""
        self._seen_step = int(step)
        if not self.active:
            return False
        if self.traces is None:
            return True
        if self.last_refresh_step is None:  # refreshed without a step (end of warm-up): count from here
            self.last_refresh_step = int(step)
            return False
        return step - self.last_refresh_step >= self.refresh_every

    # -------------------------------------------------------------------------------------- refresh
    def refresh(self, supernet: nn.Module, loss_fn: Optional[LossFn], batches: Sequence[Any],
                step: Optional[int] = None, on_path: Optional[Callable[[int, int], None]] = None,
                ) -> Optional[TraceResult]:
        """Re-estimate the per-(layer, op) traces on the first `self.batches` batches; held constant until
        the next refresh. Returns the TraceResult (None when gamma == 0). `on_path`: as supernet_traces'."""
        if not self.active:
            return None
        batches = list(batches)[: self.batches]
        if not batches:
            raise ConfigError("HessianPenalty.refresh needs at least one batch")
        _check_uniform_layers(supernet)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", HessianConvergenceWarning)
            res = supernet_traces(supernet, loss_fn, batches, self.target_rel_se, self.max_probes, self.min_probes,
                                  seed=self.seed + self.n_refreshes, method=self.method, on_path=on_path)
        for w in caught:  # expected with a small probe budget: log instead of warning at every refresh
            log.info("hessian penalty refresh: %s", w.message)
        if self.method == "auto":
            self.method = res.method  # keep the engine the first refresh found fastest
        layers = supernet.mixed_layers
        n_ops = len(layers[0].ops)
        traces = torch.zeros(len(layers), n_ops, dtype=torch.float64)
        se = torch.zeros_like(traces)
        for l in range(len(layers)):
            for i in range(n_ops):
                g = res.groups.get(op_group_name(l, i))
                if g is not None:
                    traces[l, i], se[l, i] = max(g.trace_per_param, 0.0), g.se
        self.traces, self.se = traces, se
        self.norm = self._uniform_value(supernet)
        if self.norm is None:
            log.warning("hessian penalty: every trace estimate is <= 0; the penalty is zero until the next refresh")
        # without a step: the step last seen by should_refresh (a periodic refresh), or, when none was seen yet
        # (the end of warm-up), the step of the next should_refresh call
        self.last_refresh_step = step if step is not None else self._seen_step
        self.n_refreshes += 1
        return res

    def _units(self, supernet: nn.Module) -> tuple[list[int], QuantErrorBank]:
        """Flat (l * n_ops + i) index of every op with weights, and the error bank over their weights."""
        layers = supernet.mixed_layers
        n_ops = len(layers[0].ops)
        units, idx = [], []
        for l, layer in enumerate(layers):
            for i, op in enumerate(layer.ops):
                ws = quantized_weights(op)
                if ws:
                    units.append(ws)
                    idx.append(l * n_ops + i)
        key = tuple(id(w) for ws in units for w in ws) + (units[0][0].device,)
        if self._bank is None or self._bank_key != key:
            self._bank = QuantErrorBank(units, layers[0].w_bits)
            self._bank_key = key
            self._unit_index = torch.tensor(idx, device=units[0][0].device)
        return self._unit_index, self._bank

    def _uniform_value(self, supernet: nn.Module) -> Optional[float]:
        layers = supernet.mixed_layers
        n_ops = len(layers[0].ops)
        idx, bank = self._units(supernet)
        with torch.no_grad():
            err = bank().double()
            t = self.traces.to(err.device).reshape(-1)[idx]
            z = float((t * err.mean(1)).sum() / n_ops)
        return z if z > 0 and math.isfinite(z) else None

    # -------------------------------------------------------------------------------------- penalty
    def __call__(self, supernet: nn.Module) -> torch.Tensor:
        layers = supernet.mixed_layers
        ref = layers[0].op_logits
        if not self.active or self.traces is None or self.norm is None:
            return torch.zeros((), device=ref.device, dtype=ref.dtype)
        idx, bank = self._units(supernet)
        err = bank()  # [units, n_wb]
        m = torch.stack([l.last_op_weights for l in layers]).reshape(-1)[idx]
        w = torch.stack([l.last_w_weights for l in layers]).reshape(-1, err.shape[1])[idx]
        t = self.traces.to(device=err.device, dtype=err.dtype).reshape(-1)[idx]
        value = (m.to(err.dtype) * t * (w.to(err.dtype) * err).sum(1)).sum()
        return (self.gamma / self.norm) * value

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"gamma": self.gamma, "refresh_every": self.refresh_every,
                "traces": None if self.traces is None else self.traces.tolist(),
                "se": None if self.se is None else self.se.tolist(),
                "norm": self.norm, "last_refresh_step": self.last_refresh_step, "n_refreshes": self.n_refreshes,
                "method": self.method}

    def load_state_dict(self, state: dict) -> None:
        self.traces = None if state.get("traces") is None else torch.tensor(state["traces"], dtype=torch.float64)
        self.se = None if state.get("se") is None else torch.tensor(state["se"], dtype=torch.float64)
        self.norm = state.get("norm")
        self.last_refresh_step = state.get("last_refresh_step")
        self.n_refreshes = int(state.get("n_refreshes", 0))
        self.method = state.get("method", self.method)


def _check_uniform_layers(supernet: nn.Module) -> None:
    layers = supernet.mixed_layers
    if not layers:
        raise ConfigError("the supernet has no mixed layers: nothing for the Hessian penalty to weigh")
    n_ops, w_bits = len(layers[0].ops), tuple(layers[0].w_bits)
    for l, layer in enumerate(layers):
        if len(layer.ops) != n_ops or tuple(layer.w_bits) != w_bits:
            raise ConfigError(f"mixed_layers.{l} has {len(layer.ops)} ops and weight bits {tuple(layer.w_bits)}; "
                              f"the Hessian penalty needs the same candidates and bits in every layer")

"""Hutchinson estimates of the average Hessian trace Tr(H_g)/n_g of groups of parameters.

For a Rademacher probe v, E[v^T H v] = Tr(H); restricted to a group g, v_g^T (Hv)_g has expectation Tr(H_gg).
One Hessian-vector product gives a sample for every group at once. The estimate is a stratified mean over
the given batches (each batch gets the same number of probes), so it estimates the trace of the Hessian of the
mean loss over those batches, and its standard error is sqrt(sum_b s_b^2 / n_b) / B.

Stopping: after each round (`probes_per_round` probes on every batch) a group whose relative standard error
is at or below the target (and which has at least `min_probes` probes) stops; its parameters then get zero
probes, so the remaining Hessian-vector products only cover the unconverged groups. At `max_probes` every
group stops and a HessianConvergenceWarning names the groups that did not reach the target, with their SE.

Engines for the Hessian-vector products (`method`):
- "loop": double backward through the gradient graph, built once per batch and reused, one probe per call.
- "batched[:K]": the same graph, K probes per call (autograd.grad with is_grads_batched, i.e. vmap).
- "func[:K]": forward-over-reverse, torch.func.jvp of torch.func.grad, vmapped over K probes.
- "auto": times each engine on the first batch (throw-away probes) and keeps the fastest per probe.
The probe stream and the points where convergence is checked do not depend on the engine, so two engines give
the same estimates up to floating-point rounding; name one engine for bitwise reproducibility.

The Hessian is that of the float network: quantizers are switched off (rounding has no second derivative;
HAWQ-V2 takes the trace of the full-precision model) and BatchNorm runs in eval mode. Parameters that get no
gradient (an unused supernet branch) or whose gradient does not depend on any parameter contribute zero.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, NonFiniteLossError
from ..quant.fake import bit_states

log = logging.getLogger("fbnas")

LossFn = Callable[[nn.Module, Any], torch.Tensor]
DEFAULT_MAX_PROBES = 400
DEFAULT_MIN_PROBES = 24
DEFAULT_PROBES_PER_ROUND = 16
METHODS = ("auto", "loop", "batched", "func")
AUTO_CUTOFF = 4.0  # auto: drop an engine whose warm-up per probe exceeds this x the best so far


class HessianConvergenceWarning(UserWarning):
    """The probe cap was reached before some groups reached the target relative standard error."""


def cross_entropy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default loss: cross-entropy of model(x) against y for a batch (x, y)."""
    x, y = batch[0], batch[1]
    return F.cross_entropy(model(x), y)


# ------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class GroupTrace:
    trace_per_param: float  # Tr(H_g) / n_g
    se: float  # standard error of trace_per_param
    rel_se: float  # se / |trace_per_param| (0 when se is 0)
    n_params: int
    n_probes: int
    converged: bool

    @property
    def trace(self) -> float:
        return self.trace_per_param * self.n_params


@dataclass
class TraceResult:
    groups: dict[str, GroupTrace]
    method: str
    n_hvp: int  # probe vectors used (each covers all groups still running)
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return all(g.converged for g in self.groups.values())

    def trace_per_param(self) -> dict[str, float]:
        return {k: g.trace_per_param for k, g in self.groups.items()}

    def to_dict(self) -> dict:
        return {"method": self.method, "n_hvp": self.n_hvp, "seconds": self.seconds, "settings": self.settings,
                "groups": {k: asdict(g) for k, g in self.groups.items()}}

    def table(self) -> str:
        width = max([5] + [len(k) for k in self.groups])
        rows = [f"{'group':<{width}}  {'Tr(H)/n':>11}  {'SE':>9}  {'rel SE':>7}  {'params':>9}  {'probes':>6}"]
        for name, g in self.groups.items():
            flag = "" if g.converged else "  (cap)"
            rows.append(f"{name:<{width}}  {g.trace_per_param:>11.4e}  {g.se:>9.2e}  {g.rel_se:>7.3f}  "
                        f"{g.n_params:>9d}  {g.n_probes:>6d}{flag}")
        return "\n".join(rows)


# ------------------------------------------------------------------------------------- model state

@contextmanager
def float_eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BN running statistics) and quantizers off, restored on exit."""
    training = [(m, m.training) for m in model.modules()]
    enabled = [(s, s.enabled) for s in bit_states(model)]
    model.eval()
    for s, _ in enabled:
        s.enabled = False
    try:
        yield
    finally:
        for m, t in training:
            m.training = t
        for s, e in enabled:
            s.enabled = e


# ------------------------------------------------------------------------------------------ problem

class _Problem:
    """The parameters to probe (unique, trainable), the groups as indices into them, the batches."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Sequence[Any],
                 groups: Mapping[str, Sequence[torch.Tensor]], device: torch.device):
        self.model, self.loss_fn, self.device = model, loss_fn, device
        self.batches = [_to_device(b, device) for b in batches]
        names = {id(p): n for n, p in model.named_parameters()}
        params: list[torch.Tensor] = []
        index: dict[int, int] = {}
        self.groups: dict[str, list[int]] = {}
        self.n_params: dict[str, int] = {}
        for gname, plist in groups.items():
            idx = []
            for p in plist:
                if id(p) not in names:
                    raise ConfigError(f"group {gname!r} holds a tensor that is not a parameter of the model")
                if not p.requires_grad:
                    continue
                if id(p) not in index:
                    index[id(p)] = len(params)
                    params.append(p)
                if index[id(p)] not in idx:
                    idx.append(index[id(p)])
            self.groups[gname] = idx
            self.n_params[gname] = sum(params[i].numel() for i in idx)
        self.params = params
        self.names = [names[id(p)] for p in params]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _check_loss(loss: Any, b: int) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError(f"loss_fn must return a scalar tensor; got {type(loss).__name__} on batch {b}")
    if not torch.isfinite(loss.detach()).item():
        raise NonFiniteLossError(
            f"the loss on batch {b} is {loss.item()}: Hessian traces need a finite loss; check the weights "
            f"(nan/inf after training?) and the inputs")


# ------------------------------------------------------------------------------------------ engines

class _GraphEngine:
    """Double backward through a gradient graph kept per batch; K probes per call (K=1: a plain loop)."""

    def __init__(self, problem: _Problem, chunk: int):
        self.problem, self.chunk = problem, chunk
        self.graphs: dict[int, list[Optional[torch.Tensor]]] = {}
        self.name = "loop" if chunk == 1 else f"batched:{chunk}"

    def _grads(self, b: int) -> list[Optional[torch.Tensor]]:
        if b not in self.graphs:
            pb = self.problem
            loss = pb.loss_fn(pb.model, pb.batches[b])
            _check_loss(loss, b)
            grads = torch.autograd.grad(loss, pb.params, create_graph=True, allow_unused=True)
            # a gradient that is None (unused) or constant (loss linear in it) has a zero Hessian row
            self.graphs[b] = [g if g is not None and g.requires_grad else None for g in grads]
        return self.graphs[b]

    def hvp(self, b: int, active: list[int], probes: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        grads = self._grads(b)
        live = [k for k, i in enumerate(active) if grads[i] is not None]
        out: list[Optional[torch.Tensor]] = [None] * len(active)
        if not live:
            return out
        outputs = [grads[active[k]] for k in live]
        inputs = [self.problem.params[active[k]] for k in live]
        n = probes[0].shape[0]
        pieces: list[list[torch.Tensor]] = [[] for _ in live]
        for s in range(0, n, self.chunk):
            if self.chunk == 1:
                vs = [probes[k][s] for k in live]
                hv = torch.autograd.grad(outputs, inputs, vs, retain_graph=True, allow_unused=True)
                hv = [None if h is None else h.unsqueeze(0) for h in hv]
            else:
                vs = [probes[k][s:s + self.chunk] for k in live]
                hv = torch.autograd.grad(outputs, inputs, vs, retain_graph=True, allow_unused=True,
                                         is_grads_batched=True)
            for j, h in enumerate(hv):
                pieces[j].append(torch.zeros_like(vs[j]) if h is None else h)
        for j, k in enumerate(live):
            out[k] = torch.cat(pieces[j]) if len(pieces[j]) > 1 else pieces[j][0]
        return out

    def release(self) -> None:
        self.graphs.clear()


class _Reparametrized(nn.Module):
    """Stands in for the model inside torch.func: calls it with some parameters replaced."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.inner, self.params = model, params

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.inner, self.params, args, kwargs, strict=False)


class _FuncEngine:
    """Forward-over-reverse: jvp of grad, vmapped over K probes; no graph is kept between calls."""

    def __init__(self, problem: _Problem, chunk: int):
        self.problem, self.chunk = problem, chunk
        self.name = f"func:{chunk}"

    def hvp(self, b: int, active: list[int], probes: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        pb = self.problem
        names = [pb.names[i] for i in active]
        primals = {n: pb.params[i].detach() for n, i in zip(names, active)}
        batch = pb.batches[b]

        def loss_of(pd: dict[str, torch.Tensor]) -> torch.Tensor:
            return pb.loss_fn(_Reparametrized(pb.model, pd), batch)

        grad_fn = torch.func.grad(loss_of)

        def one(tangent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return torch.func.jvp(grad_fn, (primals,), (tangent,))[1]

        batched = torch.func.vmap(one)
        n = probes[0].shape[0]
        pieces: list[list[torch.Tensor]] = [[] for _ in names]
        for s in range(0, n, self.chunk):
            # no_grad: the model's other parameters must not record an autograd graph (torch.func.grad
            # differentiates regardless)
            with torch.no_grad():
                res = batched({nm: probes[k][s:s + self.chunk] for k, nm in enumerate(names)})
            for k, nm in enumerate(names):
                pieces[k].append(res[nm])
        return [torch.cat(p) if len(p) > 1 else p[0] for p in pieces]

    def release(self) -> None:
        pass


def _make_engine(problem: _Problem, method: str, default_chunk: int):
    kind, _, k = method.partition(":")
    chunk = int(k) if k else default_chunk
    if kind == "loop":
        return _GraphEngine(problem, 1)
    if kind == "batched":
        return _GraphEngine(problem, chunk)
    if kind == "func":
        return _FuncEngine(problem, chunk)
    raise ConfigError(f"Hessian method {method!r} is not one of {', '.join(METHODS)} (optionally ':K' probes per call)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _auto_engine(problem: _Problem, active: list[int], chunk: int):
    """Time each engine on batch 0 with throw-away probes; keep the fastest per probe. Forward-over-reverse goes
    first on CUDA (usually the fastest there); an engine whose warm-up call alone costs more than
    AUTO_CUTOFF x the best per probe so far is dropped without its timed call (double backward through
    grouped convs can be 20-30x a forward+backward, and timing it in full would cost more than it could save)."""
    candidates = ([f"func:{chunk}"] if problem.device.type == "cuda" else []) + ["loop", f"batched:{chunk}"]
    gen = torch.Generator(device=problem.device).manual_seed(12345)
    best, best_t, timings = None, math.inf, {}
    for name in candidates:
        if name.startswith("batched") and "loop" in timings and timings["loop"] > AUTO_CUTOFF * best_t:
            continue  # the same double-backward graph as the loop, which was already too slow
        engine = _make_engine(problem, name, chunk)
        n = 1 if name == "loop" else chunk
        try:
            probes = _rademacher([problem.params[i] for i in active], n, gen)
            t0 = time.perf_counter()
            engine.hvp(0, active, probes)  # warm-up (and the graph for graph engines)
            _sync(problem.device)
            warm = (time.perf_counter() - t0) / n
            if warm > AUTO_CUTOFF * best_t:
                timings[name] = warm  # a warm-up time (an upper bound): enough to rule the engine out
                engine.release()
                continue
            t0 = time.perf_counter()
            for _ in range(2 if n == 1 else 1):
                engine.hvp(0, active, probes)
            _sync(problem.device)
            per_probe = (time.perf_counter() - t0) / (2 if n == 1 else n)
        except (RuntimeError, NotImplementedError) as exc:  # an engine this model or loss cannot run (or OOM)
            log.debug("hessian: engine %s unavailable: %s", name, exc)
            engine.release()
            if problem.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        timings[name] = per_probe
        if per_probe < best_t:
            if best is not None:
                best.release()
            best, best_t = engine, per_probe
        else:
            engine.release()
    if best is None:
        raise ConfigError("no Hessian-vector-product engine could run this model and loss")
    log.debug("hessian: engine timings per probe %s -> %s", timings, best.name)
    return best, timings


def _rademacher(params: Sequence[torch.Tensor], n: int, gen: torch.Generator) -> list[torch.Tensor]:
    out = []
    for p in params:
        v = torch.randint(0, 2, (n,) + tuple(p.shape), generator=gen, device=p.device, dtype=p.dtype)
        out.append(v.mul_(2).sub_(1))
    return out


# ------------------------------------------------------------------------------------ the estimator

def default_groups(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """FbnasNet: child_groups; a supernet: supernet_groups; otherwise each module's own trainable weights."""
    from .groups import child_groups, supernet_groups
    from ..model import FbnasNet

    if isinstance(model, FbnasNet):
        return child_groups(model)
    if hasattr(model, "mixed_layers"):
        return supernet_groups(model)
    groups = {}
    for name, m in model.named_modules():
        ps = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if ps:
            groups[name or "model"] = ps
    return groups


def hutchinson_traces(model: nn.Module, loss_fn: Optional[LossFn], batches: Sequence[Any],
                      groups: Optional[Mapping[str, Sequence[torch.Tensor]]] = None,
                      target_rel_se: float = 0.05, max_probes: int = DEFAULT_MAX_PROBES,
                      min_probes: int = DEFAULT_MIN_PROBES, seed: int = 0, method: str = "auto",
                      device: Optional[torch.device | str] = None,
                      probes_per_round: int = DEFAULT_PROBES_PER_ROUND) -> TraceResult:
    """Per-group average Hessian traces Tr(H_g)/n_g with their standard errors (see the module docstring).

    batches: a list of batches (each passed to loss_fn); loss_fn(model, batch) -> scalar, default CE of
    model(batch[0]) against batch[1]. max_probes / min_probes count probe vectors per group over all batches.
    """
    t_start = time.perf_counter()
    loss_fn = loss_fn or cross_entropy_loss
    batches = list(batches)
    if not batches:
        raise ConfigError("hutchinson_traces needs at least one batch")
    if not 0 < target_rel_se:
        raise ConfigError(f"target_rel_se must be > 0, got {target_rel_se}")
    if max_probes < 2:
        raise ConfigError(f"max_probes must be >= 2 (a standard error needs two probes), got {max_probes}")
    min_probes = min(min_probes, max_probes)
    model_device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device) if device is not None else model_device
    if device.type != model_device.type:
        raise ConfigError(f"the model is on {model_device} but device={device}; move the model first")
    groups = default_groups(model) if groups is None else groups
    n_batches = len(batches)
    with float_eval_mode(model):
        pb = _Problem(model, loss_fn, batches, groups, device)
        if not pb.params:
            raise ConfigError("the model has no trainable parameters in the given groups (all requires_grad="
                              "False or no groups): there is no Hessian to estimate")
        # per (group, batch): the probe samples v_g^T (H v)_g
        samples = {g: [[] for _ in range(n_batches)] for g in pb.groups}
        running = [g for g, idx in pb.groups.items() if idx]
        done_at: dict[str, int] = {}
        gen = torch.Generator(device=device).manual_seed(int(seed))
        engine, timings, selection_s = None, {}, 0.0
        n_done = 0  # probes per group so far (all running groups have the same count)
        per_round = max(1, int(probes_per_round))
        while running:
            active = sorted({i for g in running for i in pb.groups[g]})
            pos = {i: k for k, i in enumerate(active)}
            if engine is None:
                if method == "auto":
                    t_sel = time.perf_counter()
                    engine, timings = _auto_engine(pb, active, per_round)
                    selection_s = time.perf_counter() - t_sel
                else:
                    engine = _make_engine(pb, method, per_round)
            member = torch.zeros(len(running), len(active), dtype=torch.float64)
            for row, g in enumerate(running):
                member[row, [pos[i] for i in pb.groups[g]]] = 1.0
            r = min(per_round, math.ceil((max_probes - n_done) / n_batches))
            _probe_round(pb, engine, running, active, member.to(device), r, gen, samples)
            n_done += r * n_batches
            still = []
            for g in running:
                mean, se = _stratified(samples[g])
                rel = _rel(mean, se)
                if (n_done >= min_probes and rel <= target_rel_se) or n_done >= max_probes:
                    done_at[g] = n_done
                else:
                    still.append(g)
            running = still
        if engine is not None:
            engine.release()
    results = _group_traces(pb, samples, done_at, target_rel_se, max_probes)
    settings = {"target_rel_se": target_rel_se, "max_probes": max_probes, "min_probes": min_probes,
                "seed": seed, "batches": n_batches, "method": method, "probes_per_round": per_round}
    if timings:
        settings["engine_seconds_per_probe"] = timings
        settings["engine_selection_seconds"] = selection_s
    return TraceResult(results, engine.name if engine is not None else "none", n_done,
                       time.perf_counter() - t_start, settings)


def _probe_round(pb: "_Problem", engine, running: list[str], active: list[int], member: torch.Tensor, r: int,
                 gen: torch.Generator, samples: dict[str, list[list[float]]]) -> None:
    """r probe vectors on every batch: append each running group's samples v_g^T (H v)_g."""
    for b in range(len(pb.batches)):
        probes = _rademacher([pb.params[i] for i in active], r, gen)
        hv = engine.hvp(b, active, probes)
        dots = torch.stack([torch.zeros(r, device=member.device, dtype=torch.float64) if h is None else
                            (v * h).flatten(1).sum(1, dtype=torch.float64) for v, h in zip(probes, hv)])
        per_group = (member @ dots).cpu().numpy()
        if not np.isfinite(per_group).all():
            raise NonFiniteLossError(f"a Hessian-vector product on batch {b} is not finite: the loss "
                                     f"surface has inf/nan curvature at these weights")
        for g, row in zip(running, per_group):
            samples[g][b].extend(row.tolist())


def _group_traces(pb: "_Problem", samples: dict[str, list[list[float]]], done_at: dict[str, int],
                  target_rel_se: float, max_probes: int) -> dict[str, "GroupTrace"]:
    """Per-group Tr(H_g)/n_g and its SE from the samples; a warning names the groups stopped by the probe cap."""
    results: dict[str, GroupTrace] = {}
    capped = []
    for g, idx in pb.groups.items():
        n = pb.n_params[g]
        if not idx or n == 0:
            results[g] = GroupTrace(0.0, 0.0, 0.0, 0, 0, True)
            continue
        mean, se = _stratified(samples[g])
        rel = _rel(mean, se)
        converged = rel <= target_rel_se
        if not converged:
            capped.append((g, rel))
        results[g] = GroupTrace(mean / n, se / n, rel, n, done_at[g], converged)
    if capped:
        capped.sort(key=lambda t: -t[1])
        worst = ", ".join(f"{g} {r:.3f}" for g, r in capped[:5])
        warnings.warn(HessianConvergenceWarning(
            f"{len(capped)} of {len(results)} groups reached the probe cap (max_probes={max_probes}) before the "
            f"target relative SE {target_rel_se:g}; achieved rel SE: {worst}{' ...' if len(capped) > 5 else ''} "
            f"(raise max_probes or target_rel_se)"), stacklevel=3)  # the caller of hutchinson_traces
    return results


def _stratified(per_batch: list[list[float]]) -> tuple[float, float]:
    """Mean over batches of the per-batch means, and its standard error."""
    means, var = [], 0.0
    for s in per_batch:
        a = np.asarray(s, dtype=np.float64)
        means.append(a.mean())
        var += a.var(ddof=1) / len(a) if len(a) > 1 else math.inf
    nb = len(per_batch)
    return float(np.mean(means)), math.sqrt(var) / nb


def _rel(mean: float, se: float) -> float:
    if se == 0.0:
        return 0.0
    return se / abs(mean) if mean != 0.0 else math.inf

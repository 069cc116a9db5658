"""Extra terms of the search loss, added to the latency penalty's combination of cross-entropy and latency
(fbnas.objective). One registry, TERMS, built from the `objective` config: a term is off (from_config returns
None) or adds `term(supernet)` to the weight steps after warm-up and to every architecture step. Hooks: at the
start of the architecture phase and after each architecture step; `state_dict` goes into the checkpoint.

A new term: subclass LossTerm, give it `from_config(objective)` and decorate it with @register_term("name").
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Optional

import torch

from .errors import ConfigError
from .registry import Stateless, registrar

if TYPE_CHECKING:
    from .search import Searcher

log = logging.getLogger("fbnas")
TERMS: dict[str, type["LossTerm"]] = {}


register_term = registrar(TERMS)


class LossTerm(Stateless):
    name = "base"

    @classmethod
    def from_config(cls, objective: Any) -> Optional["LossTerm"]:
        raise NotImplementedError

    def __call__(self, supernet: torch.nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def start_arch_phase(self, search: "Searcher") -> None:
        pass

    def after_arch_step(self, search: "Searcher") -> None:
        pass


@register_term("hessian")
class HessianTerm(LossTerm):
    """gamma x the Hessian-trace-weighted quantization error of the sampled bits (docs/hessian.md); the traces are
    estimated at the start of the architecture phase and every `refresh_every` steps."""

    def __init__(self, penalty, config: Any):
        self.penalty = penalty
        self.config = config

    @classmethod
    def from_config(cls, objective):
        h = objective.hessian
        if h.gamma <= 0:
            return None
        try:
            from .hessian import HessianPenalty
        except ImportError:
            raise ConfigError("field 'objective.hessian.gamma' > 0 needs fbnas.hessian, which this install lacks") from None
        return cls(HessianPenalty(gamma=h.gamma, refresh_every=h.refresh_every, target_rel_se=h.target_rel_se,
                                  max_probes=h.max_probes, batches=h.batches), h)

    def __call__(self, supernet):
        return self.penalty(supernet)  # gradient to the weights through ||Q_b(W) - W||^2, to the logits as well

    def start_arch_phase(self, search):
        self.refresh(search)

    def after_arch_step(self, search):
        if self.penalty.should_refresh(search.step):
            self.refresh(search)

    def refresh(self, search: "Searcher") -> None:
        from tqdm import tqdm

        batches = search.arch_batches(self.config.batches)
        log.info("Hessian traces of every op (up to %d probes x %d batches per op)...", self.config.max_probes,
                 len(batches))
        t0 = time.time()
        with tqdm(desc="Hessian traces (paths)", disable=not search.show_progress, leave=False) as bar:
            def on_path(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            self.penalty.refresh(search.supernet, None, batches, step=search.step, on_path=on_path)
        log.info("Hessian traces refreshed in %.1f s", time.time() - t0)

    def state_dict(self):
        return self.penalty.state_dict()

    def load_state_dict(self, state):
        self.penalty.load_state_dict(state)


def build_terms(objective: Any) -> list[LossTerm]:
    """The terms the `objective` config turns on, in registry order."""
    return [t for t in (cls.from_config(objective) for cls in TERMS.values()) if t is not None]

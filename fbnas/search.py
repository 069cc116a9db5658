"""The search loop: alternating weight (SGD) and architecture (Adam) steps on the 80/20 split, Gumbel
temperature schedule, metrics, checkpoints every epoch, resume, and derivation of the architecture."""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, distributed, search_resume
from .accelerator import resolve_device
from .arch import Arch
from .checkpoint import RunCheckpoint
from .config import SearchConfig
from .cuda_graph import GraphedGradients, can_capture
from .data import DataBundle, TensorBatches, check_matches_space, load_data, make_loader
from .derive import argmax_within_limit
from .errors import ConfigError, LatencyTableError, NonFiniteLossError
from .io import append_jsonl, sha256_file
from .latency.lookup import check_target_limit
from .latency_model import LatencyModel
from .loss_terms import build_terms
from .objective import LatencyPenalty, make_penalty
from .quant.act import ActQuantizer
from .rundir import hold
from .schedules import temperature
from .search_resume import CHECKPOINT_FORMAT
from .space import load_space, override_io, save_space
from .step_stats import StepStats
from .supernet import BIT_MODES, MODES, Supernet, argmax_cost, resolved_anchor_steps, sample_cost

log = logging.getLogger("fbnas")
SPACE_FIX = ("adapt the space to the data with space_override.from_data=true (or set space_override.num_classes, "
             ".in_channels, .input_size), or pick a matching space=")


TRAIN_STATS = ("ce", "loss", "lat", "arch_ce", "arch_loss", "arch_lat")  # averaged over ranks in metrics.jsonl


@dataclass
class SearchResult:
    arch: Arch
    out_dir: Path
    latency_ms: float
    metrics: list[dict]
    device: str


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Searcher:
    def __init__(self, cfg: SearchConfig, out_dir: str | Path):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self._validate()
        self.dist = distributed.init_from_env(cfg.dist_timeout_s)  # a plain run without a launcher's environment
        self.checkpoint = RunCheckpoint(self.out_dir, CHECKPOINT_FORMAT, "search checkpoint")
        self.device = self.dist.device(resolve_device(cfg.accelerator))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # shapes repeat over thousands of steps
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        o = cfg.space_override
        self.space = override_io(load_space(cfg.space), o.in_channels, o.input_size, o.num_classes)
        self.data = self._load_data()  # space_override.from_data may change self.space
        from .latency import load_device

        device = load_device(cfg.device_file or cfg.device)
        self.space = device.search_space(self.space)  # the bit pairs the device's runtime runs
        self.latency = LatencyModel(self.space, device, cfg.lut)
        self.supernet = Supernet(self.space, mode=cfg.mode, quantized=cfg.quantized, tau=cfg.tau,
                                 bit_sampling=cfg.bit_sampling,
                                 anchor_steps=resolved_anchor_steps(cfg.mode, cfg.anchor_steps)).to(self.device)
        self.supernet.seed(cfg.seed)
        self.dist.broadcast_module(self.supernet)
        self.lat_matrix = self.latency.matrix.to(self.device)
        self.ref_ms = cfg.objective.ref_ms or self.latency.uniform_ms(self.supernet.op_has_bits())
        if cfg.objective.kind != "none" and not (math.isfinite(self.ref_ms) and self.ref_ms > 0):
            raise LatencyTableError(f"{self.latency.path or 'the latency table'}: the uniform supernet's latency is "
                                    f"{self.ref_ms} ms; a latency penalty needs a table with positive latencies "
                                    "(or a positive objective.ref_ms)")
        o = cfg.objective
        self.penalty: LatencyPenalty = make_penalty(o.kind, self.ref_ms, o)
        check_target_limit(o.kind, o.limit_ms, self.latency.matrix, self.latency.fixed_ms,
                           f"space {self.space.name} on {self.latency.device_name}")
        self.terms = build_terms(cfg.objective)  # extra loss terms (fbnas.loss_terms), e.g. the Hessian penalty
        # the checkpoint to resume, read once (None: a fresh start); its per-rank batch and world size shape the loaders
        self._resume_state: Optional[dict] = self.checkpoint.open(cfg.resume, map_location=self.device)
        self.batch_size = self.dist.per_rank_batch(cfg.data.batch_size, "data.batch_size",
                                                   search_resume.batch_of(self._resume_state))
        loader = dict(drop_last=True, device=self.device, workers=cfg.data.workers, pin_memory=cfg.data.pin_memory,
                      shard=(self.dist.rank, self.dist.world))
        self.w_loader = make_loader(self.data.train, self.batch_size * self.dist.world, True, cfg.seed,
                                    self.data.augment, **loader)
        self.a_loader = make_loader(self.data.arch, self.batch_size * self.dist.world, True, cfg.seed + 7, False,
                                    **loader)
        self.steps_per_epoch = len(self.w_loader)
        if cfg.max_steps_per_epoch > 0:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        if self.steps_per_epoch == 0 or len(self.a_loader) == 0:
            raise ConfigError(f"field 'data.batch_size' ({cfg.data.batch_size}) is larger than the weight split "
                              f"({len(self.data.train)} images) or the architecture split ({len(self.data.arch)} "
                              "images); lower it or use more data (data.train_subset, data.arch_fraction)")
        fused = self.device.type == "cuda"
        self.w_opt = torch.optim.SGD(self.supernet.weight_parameters(), lr=cfg.optim.w_lr,
                                     momentum=cfg.optim.w_momentum, weight_decay=cfg.optim.w_weight_decay)
        self.w_sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_opt,
                                                                  T_max=max(cfg.epochs * self.steps_per_epoch, 1))
        self.a_opt = torch.optim.Adam(self.supernet.arch_parameters(), lr=cfg.optim.arch_lr,
                                      weight_decay=cfg.optim.arch_weight_decay, fused=fused)
        self._w_params, self._a_params = self.supernet.weight_parameters(), self.supernet.arch_parameters()
        self.cuda_graph_reason = (can_capture(self.device, self.supernet, self.terms) if cfg.cuda_graph
                                  else "cuda_graph=false")  # None: steps replay CUDA graphs
        # NHWC by default where steps are graphed: there the GPU's kernels set the pace, and cuDNN's NHWC BatchNorm
        # and depthwise kernels are 2-10x faster on an H200; eager steps are bound by kernel launches
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else self.cuda_graph_reason is None
        if self.channels_last:
            self.supernet = self.supernet.use_channels_last()
        self._graphs: dict[tuple, tuple[GraphedGradients, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._graph_pool = None
        self._steps_run = 0
        self.epoch = 0
        self.step = 0
        self.tau_anchor: Optional[list] = None
        self.metrics: list[dict] = []
        self.wandb_run = None
        if self.space.name != load_space(cfg.space).name and self.dist.is_main:  # a derived space: keep it
            save_space(self.space, self.out_dir / "space.yaml")

    # ------------------------------------------------------------------ set-up
    def _validate(self) -> None:
        c = self.cfg
        if c.mode not in MODES:
            raise ConfigError(f"field 'mode' is {c.mode!r}; use one of {', '.join(MODES)}")
        if c.anchor_steps is not None and (c.anchor_steps < 1 or (c.anchor_steps > 1 and c.mode != "two_path")):
            raise ConfigError(f"field 'anchor_steps' is {c.anchor_steps}; use an integer >= 1 with mode=two_path, "
                              "1 or null with the other modes")
        if c.bit_sampling not in BIT_MODES:
            raise ConfigError(f"field 'bit_sampling' is {c.bit_sampling!r}; use one of {', '.join(BIT_MODES)}")
        if c.epochs < 1 or c.warmup_epochs < 0:
            raise ConfigError("fields 'epochs' (>= 1) and 'warmup_epochs' (>= 0) are out of range")
        if not (0 < c.tau and 0 < c.tau_decay <= 1):
            raise ConfigError("fields 'tau' (> 0) and 'tau_decay' (in (0, 1]) are out of range")
        if c.tau_final is not None and not 0 < c.tau_final <= c.tau:
            raise ConfigError(f"field 'tau_final' ({c.tau_final}) must be in (0, tau={c.tau}]")
        if c.derive.method not in ("argmax", "sample"):
            raise ConfigError(f"field 'derive.method' is {c.derive.method!r}; use argmax or sample")
        if c.logger not in ("none", "wandb"):
            raise ConfigError(f"field 'logger' is {c.logger!r}; use none or wandb")
        if c.data.batch_size < 1:
            raise ConfigError("field 'data.batch_size' must be >= 1")
        if not c.dist_timeout_s > 0:
            raise ConfigError(f"field 'dist_timeout_s' must be > 0, got {c.dist_timeout_s}")

    def _load_data(self) -> DataBundle:
        d, space = self.cfg.data, self.space
        bundle = load_data(d, self.cfg.seed, space.input_size, space.num_classes, space.in_channels)
        bundle.augment = bundle.augment or d.augment
        if self.cfg.space_override.from_data:
            self.space = override_io(space, bundle.in_channels, bundle.input_size, bundle.num_classes)
            if self.space is not space:
                log.info("space %s adapted to dataset %s: input %dx%dx%d, %d classes (the space has %dx%dx%d, %d "
                         "classes); searching space %s, saved as %s", space.name, bundle.name, bundle.in_channels,
                         bundle.input_size, bundle.input_size, bundle.num_classes, space.in_channels,
                         space.input_size, space.input_size, space.num_classes, self.space.name,
                         self.out_dir / "space.yaml")
        check_matches_space(bundle, self.space.in_channels, self.space.input_size, self.space.num_classes,
                            self.space.name, fix=SPACE_FIX)
        return bundle

    def temperature(self, epoch: int) -> float:
        return temperature(self.cfg, epoch, self.tau_anchor)

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        enabled = self.device.type == "cuda" and self.cfg.amp
        # no cast cache: every weight is cast once per forward anyway, and a CUDA graph capture needs it off
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled,
                              cache_enabled=False)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _forward(self, x, y):
        with self._autocast():
            logits = self.supernet(self._prep(x))
        ce = F.cross_entropy(logits.float(), y)
        lat = sample_cost(self.supernet, self.lat_matrix) + self.latency.fixed_ms
        return logits, ce, lat

    def _check_finite(self, values: dict[str, float], epoch: int, step: int) -> None:
        for where, loss_key, ce_key, lat_key in (("weight", "loss", "ce", "lat"),
                                                 ("architecture", "arch_loss", "arch_ce", "arch_lat")):
            loss = values.get(loss_key)
            if loss is None or math.isfinite(loss):
                continue
            raise NonFiniteLossError(
                f"the {where} loss became {loss} at epoch {epoch} step {step} (CE {values[ce_key]:.4g}, latency "
                f"{values[lat_key]:.4g} ms); lower optim.w_lr / optim.arch_lr or check the data and the latency "
                "table; " + (f"the last good checkpoint is {self.checkpoint.path}"
                             if self.checkpoint.path.is_file() else "no checkpoint was written yet"))

    def weight_step(self, x, y, warmup: bool) -> dict[str, torch.Tensor]:
        """One SGD step of the weights; the losses stay on the device (StepStats reads them)."""
        self.supernet.train()
        stats, replayed = self._gradients(("weight", warmup), x, y, lambda xs, ys: self._weight_loss(xs, ys, warmup),
                                          self._w_params, self.w_opt)
        self.dist.sync(self._w_params, self.supernet)  # gradients and buffers averaged over ranks
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._w_params, self.cfg.optim.grad_clip)
        self.w_opt.step()
        if replayed:
            self.w_opt.zero_grad(set_to_none=True)  # the graph's gradients: valid until another graph replays
        self.w_sched.step()
        self._steps_run += 1
        return stats

    def _weight_loss(self, x, y, warmup: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        _, ce, lat = self._forward(x, y)
        loss = ce if warmup else self._add_terms(self.penalty(ce, lat))
        return {"ce": ce.detach(), "loss": loss.detach(), "lat": lat.detach()}, loss

    def arch_step(self, x, y) -> dict[str, torch.Tensor]:
        """One Adam step of the architecture logits (replayed as a CUDA graph where the weight steps are), then
        the penalty's update (e.g. the target multiplier) with the latency of the network derived now; no host
        read. The weights do not require grad meanwhile, so no weight gradient is computed."""
        self.supernet.train()
        weights = self._w_params
        for p in weights:
            p.requires_grad_(False)
        try:
            stats, replayed = self._gradients(("arch",), x, y, self._arch_loss, self._a_params, self.a_opt)
            self.dist.sync(self._a_params, self.supernet)
            self.a_opt.step()
            if replayed:
                self.a_opt.zero_grad(set_to_none=True)  # the graph's gradients: valid until another graph replays
            self.penalty.update(argmax_cost(self.supernet, self.lat_matrix) + self.latency.fixed_ms)
        finally:
            for p in weights:
                p.requires_grad_(True)
        return stats

    def _arch_loss(self, x, y) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        _, ce, lat = self._forward(x, y)
        loss = self._add_terms(self.penalty(ce, lat))
        return {"arch_ce": ce.detach(), "arch_loss": loss.detach(), "arch_lat": lat.detach()}, loss

    # ------------------------------------------------------------------ CUDA graphs
    def _gradients(self, kind: tuple, x, y, loss_of, params, opt) -> tuple[dict[str, torch.Tensor], bool]:
        """(the step's statistics, whether they were replayed): the gradients of `params` from the CUDA graph of
        `kind` where steps replay graphs, else from an eager backward of loss_of(x, y) into opt's zeroed grads.
        Replayed gradients are the graph's: zero them after the optimizer step."""
        stats = self._replay(kind, x, y, loss_of, params) if self._graphed_steps() else None
        if stats is not None:
            return stats, True
        opt.zero_grad(set_to_none=True)
        stats, loss = loss_of(x, y)
        loss.backward()
        return stats, False

    def _graphed_steps(self) -> bool:
        """Whether this step replays a CUDA graph: possible (cuda_graph_reason is None) and past the first eager
        step, which gives every activation quantizer its range."""
        return self.cuda_graph_reason is None and self._steps_run > 0

    def _replay(self, kind: tuple, x, y, loss_of, params) -> Optional[dict[str, torch.Tensor]]:
        """Copy (x, y) into the inputs of the graph of `kind` at the current temperature (captured on first use:
        the temperature is a constant inside it), draw the sample on the host, replay; the params' gradients
        are the graph's until the optimizer has stepped. All graphs share one memory pool: each graph's
        statistics are copied and its gradients used before another graph replays (the warm-up weight step,
        the weight step and the arch step are three graphs). A capture that fails turns graphs off for the run
        (logged) and returns None: the step then runs eagerly."""
        tau = self.supernet.tau
        if any(k[-1] != tau for k in self._graphs):  # a new temperature: recapture, in a new pool (a pool
            self._graphs, self._graph_pool = {}, None  # dies with the last graph that used it)
        key = kind + (tau,)
        if key not in self._graphs:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
                self.penalty.to(self.device)
            inputs = (torch.empty_like(x), torch.empty_like(y))

            def compute():
                with self.supernet.staging():
                    return loss_of(*inputs)

            self._graphs[key] = (GraphedGradients(compute, params, pool=self._graph_pool,
                                                  release=self.supernet.release_sample), inputs)
            log.info("search step: capturing the %s step as a CUDA graph (tau %.4g)", kind[0], tau)
        graph, (xs, ys) = self._graphs[key]
        xs.copy_(x, non_blocking=True)
        ys.copy_(y, non_blocking=True)
        self.supernet.stage_sample()
        if graph.graph is not None:
            return graph()
        try:
            return graph()
        except RuntimeError as e:  # the capture: PyTorch's errors in it are RuntimeErrors
            self.cuda_graph_reason = f"the capture failed: {str(e).splitlines()[0]}"
            self._graphs, self._graph_pool = {}, None
            log.warning("search step: %s; the steps run eagerly from here", self.cuda_graph_reason)
            return None

    def _add_terms(self, loss: torch.Tensor) -> torch.Tensor:
        for term in self.terms:
            loss = loss + term(self.supernet)
        return loss

    @property
    def show_progress(self) -> bool:
        return self.cfg.progress and self.dist.is_main

    def arch_batches(self, n: int) -> list:
        """The first `n` batches of the architecture split, ready for the supernet (e.g. for Hessian traces)."""
        batches = []
        for i, (x, y) in enumerate(self.a_loader):
            if i >= n:
                break
            batches.append((self._prep(x), y))
        return batches

    # ------------------------------------------------------------------ evaluation and derivation
    @torch.no_grad()
    def recalibrated_child(self, choice, batches: int) -> Supernet:
        """A copy of the supernet fixed to `choice` whose BatchNorm statistics are re-estimated on `batches`
        training batches of that path (a supernet's running statistics mix the inputs of every upstream
        choice, so they fit no single path). Activation ranges stay as trained."""
        net = Supernet(self.space, mode=self.cfg.mode, quantized=self.cfg.quantized).to(self.device)
        net.load_state_dict(self.supernet.state_dict())
        net.fix(choice)
        net.train()
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
            elif isinstance(m, ActQuantizer):
                m.frozen = True
        loader = make_loader(self.data.train, self.cfg.data.eval_batch_size, True, self.cfg.seed + 99,
                             device=self.device)
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            with self._autocast():
                net(self._prep(x))
        return net.eval()

    @torch.no_grad()
    def evaluate_choice(self, choice, batches: int) -> tuple[float, float]:
        """(mean CE, accuracy) of one architecture, run inside a BN-recalibrated copy of the supernet, on
        `batches` arch-split batches."""
        net = self.recalibrated_child(choice, self.cfg.derive.calibration_batches)
        loader = TensorBatches(self.data.arch, self.cfg.data.eval_batch_size, shuffle=False, device=self.device,
                               shard=(self.dist.rank, self.dist.world)) \
            if not isinstance(self.a_loader, torch.utils.data.DataLoader) else self.a_loader
        total, correct, loss_sum = 0, 0, 0.0
        for i, (x, y) in enumerate(loader):
            if i >= batches:
                break
            with self._autocast():
                logits = net(self._prep(x)).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            total += len(y)
        loss_sum, correct, total = self.dist.sum(loss_sum, correct, total)  # the same images on any world size
        return loss_sum / max(total, 1), correct / max(total, 1)

    def derive(self) -> tuple[Arch, dict]:
        d = self.cfg.derive
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)
        choices = self.supernet.sample_choices(d.k if d.method == "sample" else 1, gen)
        limit = self.penalty.derive_limit_ms()
        if limit is not None:  # the most probable architecture within the limit replaces an argmax over it
            choices[0] = argmax_within_limit(choices[0], self.supernet.probabilities(), self.supernet.op_has_bits(),
                                             self.latency.matrix, self.latency.fixed_ms, limit)
        best, best_key, scored = None, math.inf, []
        for choice in choices:
            arch = self.supernet.choice_to_arch(choice)
            lat = self.latency.of_arch(arch)
            if limit is not None and lat > limit * (1 + 1e-6) and choice is not choices[0]:
                continue  # a sampled architecture over the limit
            ce, acc = self.evaluate_choice(choice, d.eval_batches)
            obj = float(self.penalty(torch.tensor(ce), torch.tensor(lat)))
            scored.append({"latency_ms": lat, "val_ce": ce, "val_acc": acc, "objective": obj})
            if obj < best_key:
                best, best_key = (arch, scored[-1]), obj
        arch, score = best
        return arch, {"candidates": scored, **score}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict:
        return search_resume.checkpoint_state(self)

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            self.checkpoint.save(self.checkpoint_state())

    def load_checkpoint(self) -> None:
        state, self._resume_state = self._resume_state, None
        search_resume.restore(self, state)

    def space_definition(self) -> dict:
        """The space's shape, ops and bits (an edited space file under the same name is another space)."""
        return {k: v for k, v in self.space.to_dict().items() if k not in ("description", "dataset")}

    # ------------------------------------------------------------------ the loop
    def _log(self, record: dict) -> None:
        record = self.dist.mean_of(record, TRAIN_STATS)  # the ranks' statistics, averaged
        waits = self.dist.sum(self.w_loader.take_wait() + self.a_loader.take_wait())
        record.update(data_seconds=round(waits[0] / self.dist.world, 3), world_size=self.dist.world)
        self.dist.check_same(torch.cat([p.detach().flatten() for p in self._a_params]), "architecture logits")
        self.dist.check_paths()
        if not self.dist.is_main:
            return
        self.metrics.append(record)
        append_jsonl(self.out_dir / "metrics.jsonl", record)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if not k.endswith("_probs")}, step=self.step)

    @torch.no_grad()
    def _probabilities(self) -> dict:
        """softmax(theta) per layer, for `fbnas report`: op probabilities [L][ops], and the weight / activation
        bit probabilities [L][bits] averaged over the layer's ops that have bits, weighted by their probability."""
        ops, ws, as_ = (t.detach().float().cpu() for t in self.supernet.probabilities())
        weight = ops * self.supernet.op_has_bits().float()
        norm = weight.sum(1, keepdim=True).clamp_min(1e-12)

        def rows(t: torch.Tensor) -> list[list[float]]:
            return [[round(float(v), 5) for v in row] for row in t]

        return {"op_probs": rows(ops), "w_bit_probs": rows((weight[..., None] * ws).sum(1) / norm),
                "a_bit_probs": rows((weight[..., None] * as_).sum(1) / norm),
                "bit_choices": {"w": list(self.space.w_bits), "a": list(self.space.a_bits)}}  # the device's

    def _start_wandb(self) -> None:
        if self.cfg.logger == "wandb" and self.dist.is_main:
            from .wandb_run import start_wandb

            self.wandb_run = start_wandb(self.cfg.wandb, self.out_dir, dataclasses.asdict(self.cfg), "search")

    def run(self) -> SearchResult:
        from contextlib import nullcontext

        # one run per directory (the CLI has taken it already); rank 0 holds it for the job
        with hold(self.out_dir) if self.dist.is_main else nullcontext():
            return self._run()

    def _run(self) -> SearchResult:
        if self.cfg.resume:
            self.load_checkpoint()
        elif self.dist.is_main:  # lines of an earlier start in this directory that never reached a checkpoint
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
        self._start_wandb()
        cfg = self.cfg
        log.info("search: space %s (%d layers x %d ops, w bits %s, a bits %s), device %s, mode %s, ref %.3f ms",
                 self.space.name, self.space.num_layers, len(self.space.candidates), self.space.w_bits,
                 self.space.a_bits, self.latency.device_name, cfg.mode, self.ref_ms)
        if self.device.type == "cuda":
            log.info("search step: weight and architecture steps %s, %s", "as CUDA graphs"
                     if self.cuda_graph_reason is None else f"eager ({self.cuda_graph_reason})",
                     "NHWC" if self.channels_last else "NCHW")
        while self.epoch < cfg.epochs:
            warmup = self.epoch < cfg.warmup_epochs
            self.supernet.tau = self.temperature(self.epoch)
            if not warmup and self.epoch == cfg.warmup_epochs:
                for term in self.terms:
                    term.start_arch_phase(self)
            t0 = time.time()
            means = self._train_epoch(warmup)
            self.epoch += 1
            record = self._epoch_record(warmup, means, t0)
            self._log(record)
            self.save_checkpoint()
            log.info("epoch %d/%d: ce %.3f, E[lat] %.3f ms, argmax %.3f ms, val acc %.3f (%.0fs)", self.epoch,
                     cfg.epochs, record.get("ce", float("nan")), record.get("lat", float("nan")),
                     record["argmax_latency_ms"], record["argmax_val_acc"], record["seconds"])
        arch, score = self.derive()
        arch = self.annotate(arch, score)
        if self.dist.is_main:
            arch.save(self.out_dir / "arch.json")
        if self.wandb_run is not None:
            self.wandb_run.summary.update({"latency_ms": score["latency_ms"], "val_acc": score["val_acc"]})
            self.wandb_run.finish()
        return SearchResult(arch, self.out_dir, score["latency_ms"], self.metrics, self.latency.device_name)

    def _train_epoch(self, warmup: bool) -> dict[str, float]:
        """One epoch of weight steps with an architecture step every len(w_loader)/len(a_loader) of them (none
        in warm-up); returns the epoch's mean of every step statistic."""
        from tqdm import tqdm

        arch_every = max(1, self.steps_per_epoch // max(len(self.a_loader), 1))
        a_iter = iter(self.a_loader)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}"
                   + (" (warm-up)" if warmup else ""), disable=not self.show_progress, leave=False)
        stats_reader = StepStats(self.device)

        def account(read) -> None:
            if read is None:
                return
            values, (epoch, step) = read
            self._check_finite(values, epoch, step)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            bar.update(1)
            bar.set_postfix(ce=f"{values['ce']:.3f}", lat=f"{values['lat']:.3f}")

        for i, (x, y) in enumerate(self.w_loader):
            if i >= self.steps_per_epoch:
                break
            stats = self.weight_step(x, y, warmup)
            if not warmup and i % arch_every == 0:
                try:
                    xa, ya = next(a_iter)
                except StopIteration:
                    a_iter = iter(self.a_loader)
                    xa, ya = next(a_iter)
                stats.update(self.arch_step(xa, ya))
                for term in self.terms:
                    term.after_arch_step(self)
            account(stats_reader.push(stats, (self.epoch, self.step)))
            self.step += 1
        account(stats_reader.flush())
        bar.close()
        return {k: sums[k] / counts[k] for k in sums}

    def _epoch_record(self, warmup: bool, means: dict[str, float], t0: float) -> dict:
        """The metrics.jsonl line of the epoch just finished: its means, the argmax architecture evaluated inside
        the supernet, the probabilities, and the penalty's state (e.g. the target multiplier mu)."""
        choice = self.supernet.argmax_choice()
        arch = self.supernet.choice_to_arch(choice)
        val_ce, val_acc = self.evaluate_choice(choice, self.cfg.derive.eval_batches)
        return {"epoch": self.epoch, "step": self.step, "tau": self.supernet.tau, "warmup": warmup,
                "lr": self.w_sched.get_last_lr()[0], "seconds": round(time.time() - t0, 2), **means,
                "argmax_latency_ms": self.latency.of_arch(arch), "argmax_val_ce": val_ce, "argmax_val_acc": val_acc,
                "argmax_ops": [l.op for l in arch.layers], "argmax_w_bits": [l.w_bits for l in arch.layers],
                "argmax_a_bits": [l.a_bits for l in arch.layers], **self._probabilities(),
                **self.penalty.state_dict()}

    def annotate(self, arch: Arch, score: dict) -> Arch:
        lut_path = self.latency.path
        predicted = {self.latency.device_name: {"latency_ms": round(score["latency_ms"], 6), "source": "lut"},
                     "size_kb": round(arch.size_kb(), 3), "bops": arch.bops(), "macs": arch.macs(),
                     "params": arch.params(), "val_acc_in_supernet": round(score["val_acc"], 4)}
        provenance = {"fbnas_version": __version__, "device": self.latency.device_name, "space": self.space.name,
                      "lut": str(lut_path) if lut_path else "built in memory (analytic)",
                      "lut_sha256": sha256_file(lut_path) if lut_path and Path(lut_path).is_file() else None,
                      "space_file": str(self.out_dir / "space.yaml") if (self.out_dir / "space.yaml").is_file() else None,
                      "seed": self.cfg.seed, "derive": self.cfg.derive.method, "config": dataclasses.asdict(self.cfg),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        return dataclasses.replace(arch, predicted=predicted, provenance=provenance,
                                   preprocessing=self.data.preprocessing())


def run_search(cfg: SearchConfig, out_dir: str | Path) -> SearchResult:
    """Search an architecture and its bits; writes metrics.jsonl, checkpoints/last.pt and arch.json."""
    return Searcher(cfg, out_dir).run()

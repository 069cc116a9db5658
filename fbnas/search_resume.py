"""A search's checkpoint: what it holds, and resuming from it (the same run's settings checked, the schedules
extended when `epochs` changed). Functions of a Searcher (fbnas.search), kept apart from its loop."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from .checkpoint import rng_state, set_rng_state
from .errors import CheckpointError
from .io import truncate_jsonl
from .resume import mismatched_fields, refuse_mismatch
from .schedules import temperature
from .supernet import resolved_anchor_steps

if TYPE_CHECKING:
    from .search import Searcher

log = logging.getLogger("fbnas")
CHECKPOINT_FORMAT = "fbnas-search-checkpoint/2"  # /1 stored numpy and Python RNG states as objects
# fields a resume may change (the rest must equal the checkpoint's); device and table are compared by name and numbers
RESUME_FREE = ("epochs", "resume", "progress", "logger", "wandb", "threads", "accelerator", "derive", "lut",
               "device", "device_file", "dist_timeout_s", "data.workers", "data.pin_memory",
               "data.batch_size",  # per rank: the global batch is checked instead (distributed.per_rank_batch)
               "cuda_graph", "channels_last")  # how the same arithmetic is launched and laid out


def checkpoint_state(s: "Searcher") -> dict:
    """What a search's checkpoint holds (RunCheckpoint.save adds its format and the fbnas version)."""
    return {
        "supernet": s.supernet.state_dict(),
        "w_opt": s.w_opt.state_dict(), "w_sched": s.w_sched.state_dict(), "a_opt": s.a_opt.state_dict(),
        "penalty": s.penalty.state_dict(),
        "terms": {t.name: t.state_dict() for t in s.terms},
        "epoch": s.epoch, "step": s.step,
        "rng": {**rng_state(),
                "supernet": s.supernet.generator.get_state(), "sampler": s.supernet.sampler_state(),
                "w_loader": getattr(s.w_loader, "state_dict", lambda: None)(),
                "a_loader": getattr(s.a_loader, "state_dict", lambda: None)()},
        "tau_anchor": s.tau_anchor,
        "space": s.space.name, "space_bits": [list(s.space.w_bits), list(s.space.a_bits)],
        "device": s.latency.device_name, "config": dataclasses.asdict(s.cfg),
        "lut_fingerprint": s.latency.fingerprint(), "space_definition": s.space_definition(),
        "world_size": s.dist.world, "batch_size": s.batch_size,
    }


def batch_of(state: Optional[dict]) -> Optional[dict]:
    """The per-rank batch and world size of a checkpoint being resumed (the data loaders depend on them)."""
    if state is None:
        return None
    return {"world_size": state.get("world_size", 1),
            "batch_size": state.get("batch_size", state["config"]["data"]["batch_size"])}


def restore(s: "Searcher", state: Optional[dict] = None) -> None:
    """Load the search's checkpoint (or its `state`, already read) into `s`: weights, optimizers, schedules,
    penalty, RNG and sampler states."""
    path = s.checkpoint.path
    if state is None:
        state = s.checkpoint.open(resume=True, map_location=s.device)
    check_same_run(s, path, state)
    try:
        s.supernet.load_state_dict(state["supernet"])
    except RuntimeError:
        raise CheckpointError(f"{path}: the checkpoint's supernet does not match space {s.space.name}") from None
    s.w_opt.load_state_dict(state["w_opt"])
    s.w_sched.load_state_dict(state["w_sched"])
    s.tau_anchor = state.get("tau_anchor")
    s.a_opt.load_state_dict(state["a_opt"])
    s.penalty.load_state_dict(state["penalty"])
    saved_terms = state.get("terms", {"hessian": state.get("hessian")})  # a checkpoint with a "hessian" key loads too
    for term in s.terms:
        if saved_terms.get(term.name):
            term.load_state_dict(saved_terms[term.name])
    s.epoch, s.step = state["epoch"], state["step"]
    rng = state["rng"]
    set_rng_state(rng)
    s.supernet.generator.set_state(rng["supernet"].cpu())
    s.supernet.load_sampler_state(rng.get("sampler"))
    for loader, key in ((s.w_loader, "w_loader"), (s.a_loader, "a_loader")):
        if rng.get(key) is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict({"generator": rng[key]["generator"].cpu()})
    if state["config"]["epochs"] != s.cfg.epochs:
        extend_schedules(s, state["config"])
    if s.dist.is_main:
        s.metrics = truncate_jsonl(s.out_dir / "metrics.jsonl", lambda m: m.get("epoch", 0) <= s.epoch)
    log.info("resumed %s at epoch %d (step %d)", path, s.epoch, s.step)


def effective_anchor_steps(config: dict, saved: bool = False) -> dict:
    """`config` with anchor_steps as the search runs it (a checkpoint without the field was made before
    anchors, i.e. with 1)."""
    steps = config.get("anchor_steps", 1 if saved else None)
    return {**config, "anchor_steps": resolved_anchor_steps(config.get("mode", "soft"), steps)}


def check_same_run(s: "Searcher", path: Path, state: dict) -> None:
    """Refuse a checkpoint made with other result-determining settings (fields of SearchConfig except
    RESUME_FREE; the target device by name and the latency numbers by fingerprint, not by file path)."""
    saved = {"space": state.get("space"), "space_definition": state.get("space_definition"),
             "device": state.get("device"), "latency table": state.get("lut_fingerprint")}
    mine = {"space": s.space.name, "space_definition": s.space_definition(),
            "device": s.latency.device_name, "latency table": s.latency.fingerprint()}
    diffs = mismatched_fields(saved, mine, ()) + mismatched_fields(
        effective_anchor_steps(state["config"], saved=True), effective_anchor_steps(dataclasses.asdict(s.cfg)),
        RESUME_FREE)
    refuse_mismatch(path, "search checkpoint", diffs, RESUME_FREE)
    if s.cfg.epochs < state["epoch"]:
        raise CheckpointError(f"{path}: the checkpoint is at epoch {state['epoch']}; field 'epochs' "
                              f"({s.cfg.epochs}) cannot be fewer")


def extend_schedules(s: "Searcher", old_cfg: dict) -> None:
    """Resume with another `epochs`: the weights' cosine continues from its current learning rate down to 0 at
    the new last step, and the temperature from the last epoch's value geometrically to tau_final at the new
    last epoch (no restart, no re-heating). A finished run being extended therefore keeps its final learning
    rate (0) and temperature."""
    remaining = s.cfg.epochs * s.steps_per_epoch - s.step
    s.w_sched = torch.optim.lr_scheduler.CosineAnnealingLR(s.w_opt, T_max=max(remaining, 1))
    if s.cfg.tau_final is not None and s.epoch > 0:
        old = dataclasses.replace(s.cfg, epochs=old_cfg["epochs"])
        last = s.epoch - 1
        s.tau_anchor = [last, temperature(old, last, s.tau_anchor)]
    log.info("epochs %d -> %d: schedules continue from lr %.4g, tau %.4g", old_cfg["epochs"], s.cfg.epochs,
             s.w_opt.param_groups[0]["lr"], s.temperature(s.epoch))

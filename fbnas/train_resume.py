"""A training run's checkpoint: what it holds, what a resume must keep equal (the settings, the architecture and
the training data), and metrics.jsonl cut back to it. Functions of fbnas.train, kept apart from its loop."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from . import distributed
from .arch import Arch
from .checkpoint import RunCheckpoint
from .config import TrainSettings, current_names
from .data import DataBundle, TensorData
from .io import truncate_jsonl
from .resume import mismatched_fields, refuse_mismatch, tensor_fingerprint

CHECKPOINT_FORMAT = "fbnas-train-checkpoint/1"
# settings a resume may change; the rest, epochs and fold_epochs included (the LR schedule is laid out over the
# whole run at its start), must equal the checkpoint's
RESUME_FREE = ("settings.accelerator", "settings.eval_batch_size",
               "settings.batch_size")  # per rank: the global batch is checked instead (distributed.per_rank_batch)


def train_checkpoint(out_dir: Path) -> RunCheckpoint:
    return RunCheckpoint(out_dir, CHECKPOINT_FORMAT, "train checkpoint")


def run_identity(arch: Arch, data: DataBundle, s: TrainSettings) -> dict:
    """What determines a training run's result: settings, architecture and the training data (by fingerprint)."""
    train_set = data.train
    if isinstance(train_set, TensorData):
        stride = max(1, len(train_set) // 256)
        fingerprint = tensor_fingerprint(train_set.x[::stride], train_set.y)
    else:
        fingerprint = f"{type(train_set).__name__} of {len(train_set)}"
    return {"settings": asdict(s), "arch": [[l.op, l.channels, l.stride, l.w_bits, l.a_bits] for l in arch.layers],
            "data": {"name": data.name, "train": fingerprint}}


def open_checkpoint(checkpoint: RunCheckpoint, resume: bool, identity: dict) -> Optional[dict]:
    """The checkpoint to resume (None: a fresh start), after refusing a resume without a checkpoint, a fresh start
    over one, and a checkpoint of other result-determining settings (`identity`: this run's run_identity)."""
    ckpt = checkpoint.open(resume)
    if ckpt:
        ckpt["identity"]["settings"] = current_names(ckpt["identity"]["settings"])
        refuse_mismatch(checkpoint.path, checkpoint.what, mismatched_fields(ckpt["identity"], identity, RESUME_FREE),
                        RESUME_FREE)
    return ckpt


def save_after_epoch(checkpoint: RunCheckpoint, phase: str, next_epoch: int, run_state: dict, extra: dict,
                     identity: dict, batch_size: int) -> None:
    """The state after an epoch: the phase, the epoch to continue at, the phase's model, optimizer, scheduler, EMA
    and data order (`run_state`), the metrics so far (`extra`) and the torch RNG. Rank 0 writes for the job."""
    dist = distributed.current()
    if dist.is_main:
        checkpoint.save({"phase": phase, "epoch": next_epoch, "run": run_state, "extra": extra,
                         "rng": torch.get_rng_state(), "identity": identity, "world_size": dist.world,
                         "batch_size": batch_size})


def restart_metrics(path: Path, ckpt: Optional[dict], phases: list[str]) -> None:
    """metrics.jsonl on a resume: the lines up to the checkpoint (a torn line or epochs after it are dropped); on a
    fresh start: none (lines of an earlier start in this directory that never reached a checkpoint)."""
    if ckpt is None:
        path.unlink(missing_ok=True)
        return
    done = (phases.index(ckpt["phase"]), ckpt["epoch"])
    truncate_jsonl(path, lambda r: r.get("phase") in phases and (phases.index(r["phase"]), r.get("epoch", 1 << 30))
                   < done)

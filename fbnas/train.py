"""Training of a found architecture: FP32, or quantization-aware training at its per-layer bits.

QAT has two phases (HAWQ-V3): (1) fake quantization with float BN, (2) BN folded with its running statistics
into the convs (`FoldedNet`: quantized exactly where the integer model quantizes, dyadic rescaling), the
activation ranges frozen for the last epoch. Then the integer-only model is derived and evaluated. timm
provides the optimizer, the scheduler and the weight EMA. Every epoch ends with an atomic checkpoint;
`resume=True` continues from it (same phase, epoch, optimizer, scheduler, EMA, data order and RNG).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from .arch import Arch
from .config import TrainSettings  # defined with the other configs; in this API

from . import distributed
from .data import DataBundle, make_loader
from .errors import ConfigError, NonFiniteLossError
from .io import append_jsonl, atomic_write_json
from .accelerator import resolve_device
from .model import build_model
from .quant.artifacts import load_supernet_into, load_unfolded_into, save_integer, save_state
from .rundir import hold
from .quant.fake import QConv2d, QLinear
from .quant.fold import FoldedNet, QuantPoint, fold_model
from .quant.integer import to_integer
from .train_resume import open_checkpoint, restart_metrics, run_identity, save_after_epoch, train_checkpoint

log = logging.getLogger("fbnas")


# ------------------------------------------------------------------------------------------ helpers

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> float:
    """Top-1 accuracy in percent."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    correct, total = distributed.current().sum(correct, total)  # each rank evaluated its share
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def predictions(model: nn.Module, loader, device: torch.device) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x.to(device)).argmax(1).cpu() for x, _ in loader])


def set_act_clipping(net: nn.Module, mode: str) -> None:
    """Point every activation quantizer of a fixed-bit model at its bits (mode 'mse') or at min/max ('max')."""
    for m in net.modules():
        if isinstance(m, (QConv2d, QLinear)) and m.bit_state.enabled and len(m.bit_state.a_choices) == 1:
            m.act_quant.clip_bits = m.bit_state.a_choices[0] if mode == "mse" else None
        elif isinstance(m, QuantPoint):
            m.observer.clip_bits = m.bits if mode == "mse" else None


def set_quantization(net: nn.Module, enabled: bool) -> None:
    """Turn the fake quantizers of an FbnasNet on or off (the float accuracy of QAT weights)."""
    for m in net.modules():
        if isinstance(m, (QConv2d, QLinear)):
            m.bit_state.enabled = enabled


def _phases(s: TrainSettings) -> list[tuple[str, int]]:
    if not s.quantized:
        return [("float", s.epochs + s.fold_epochs)]
    return [p for p in (("bn", s.epochs), ("folded", s.fold_epochs)) if p[1] > 0]


class _PhaseRun:
    """Optimizer, scheduler, EMA and data order of one training phase."""

    def __init__(self, model: nn.Module, s: TrainSettings, n_epochs: int, lr: float, steps: int, data, seed: int,
                 device: torch.device, batch_size: int):
        self.model = model
        self.optimizer = create_optimizer_v2(model, opt=s.opt, lr=lr, weight_decay=s.weight_decay,
                                             momentum=s.momentum)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched=s.sched, num_epochs=n_epochs,
                                                warmup_epochs=min(s.warmup_epochs, max(n_epochs - 1, 0)),
                                                min_lr=s.min_lr, warmup_lr=lr * 0.1, step_on_epochs=False,
                                                updates_per_epoch=steps)
        self.ema = ModelEmaV3(model, decay=s.ema_decay, use_warmup=True) if s.ema else None
        dist = distributed.current()
        self.loader = make_loader(data, batch_size * dist.world, shuffle=True, seed=seed, augment=False,
                                  drop_last=True, device=device, workers=-1, shard=(dist.rank, dist.world))
        self.steps = steps
        self.params = [p for p in model.parameters() if p.requires_grad]

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "loader": self.loader.state_dict()}

    def load_state_dict(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        if self.ema is not None and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        self.loader.load_state_dict(st["loader"])


def _train_epoch(run: _PhaseRun, epoch: int, s: TrainSettings, device: torch.device, bar_desc: str = "",
                 progress: bool = False) -> dict:
    from tqdm import tqdm

    model = run.model
    model.train()
    total_loss, n, correct, t0 = 0.0, 0, 0, time.time()
    bar = tqdm(total=run.steps, desc=bar_desc, disable=not progress, leave=False, dynamic_ncols=True)
    for i, (x, y) in enumerate(run.loader):
        if i >= run.steps:
            break
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=s.label_smoothing)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss became {loss.item()} at epoch {epoch} step {i}; lower field 'lr'")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.current().sync(run.params, model)  # gradients and buffers averaged over ranks
        run.optimizer.step()
        step = epoch * run.steps + i + 1
        run.scheduler.step_update(step)
        if run.ema is not None:
            run.ema.update(model, step=step)
        total_loss += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    distributed.current().check_paths()
    total_loss, correct, n = distributed.current().sum(total_loss, correct, n)
    return {"loss": total_loss / max(n, 1), "train_acc": 100.0 * correct / max(n, 1), "seconds": time.time() - t0,
            "data_seconds": round(run.loader.take_wait(), 3)}


# --------------------------------------------------------------------------------------------- train

def train(arch: Arch, data: DataBundle, s: TrainSettings, out_dir: str | Path, resume: bool = False,
          on_epoch: Optional[Callable[[dict], None]] = None, progress: bool = False) -> dict:
    """Train `arch` on `data` and write model.safetensors, integer.safetensors, quant_params.json, metrics.json,
    metrics.jsonl and checkpoints/last.pt into out_dir. Returns the final metrics. `progress`: a bar per epoch."""
    s.check()
    from contextlib import nullcontext

    # one run per directory (the CLI has taken it already); under torchrun rank 0 holds it and alone writes
    with hold(out_dir) if distributed.init_from_env().is_main else nullcontext():
        return _train(arch, data, s, Path(out_dir), resume, on_epoch, progress)


def _train(arch: Arch, data: DataBundle, s: TrainSettings, out_dir: Path, resume: bool,
           on_epoch: Optional[Callable[[dict], None]], progress: bool = False) -> dict:
    dist = distributed.current()
    main = dist.is_main
    progress = progress and main
    device = dist.device(resolve_device(s.accelerator))
    if device.type == "cuda":  # TF32 would make float convs on integer-valued tensors inexact
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(s.seed)
    checkpoint, identity = train_checkpoint(out_dir), run_identity(arch, data, s)
    ckpt = open_checkpoint(checkpoint, resume, identity)
    batch = dist.per_rank_batch(s.batch_size, "batch_size", ckpt)
    eval_loader = make_loader(data.test, s.eval_batch_size, shuffle=False, device=device, shard=(dist.rank, dist.world))
    n_train = len(data.train)
    per_step = batch * dist.world  # the global batch
    steps = n_train // per_step
    if s.max_steps_per_epoch > 0:
        steps = min(s.max_steps_per_epoch, steps)
    if steps == 0:
        raise ConfigError(f"field 'batch_size' ({s.batch_size}) is larger than the training set ({n_train})")
    metrics: dict = dict(ckpt["extra"]) if ckpt else {}
    phases = _phases(s)
    names = [p for p, _ in phases]
    start_phase = names.index(ckpt["phase"]) if ckpt else 0
    if main:
        arch.save(out_dir / "arch.json")
        restart_metrics(out_dir / "metrics.jsonl", ckpt, names)
    if ckpt:
        torch.set_rng_state(ckpt["rng"])

    net: nn.Module = build_model(arch, quantized=s.quantized).to(device)
    if s.init == "supernet" and not ckpt:
        load_supernet_into(net, arch, s.supernet)
    elif s.init == "weights" and not ckpt:
        load_unfolded_into(net, arch, s.weights)
    dist.broadcast_module(net)
    set_act_clipping(net, s.act_clip)
    for p_idx in range(start_phase, len(phases)):
        phase, n_epochs = phases[p_idx]
        if phase == "folded":
            net = _folded_from(net, ckpt if (ckpt and ckpt["phase"] == "folded") else None, data, s, device,
                               batch * dist.world)
        lr = s.lr * (s.fold_lr_scale if phase == "folded" else 1.0)
        run = _PhaseRun(net, s, n_epochs, lr, steps, data.train, s.seed + p_idx, device, batch)
        first_epoch = 0
        if ckpt and ckpt["phase"] == phase:
            run.load_state_dict(ckpt["run"])
            first_epoch = ckpt["epoch"]
            ckpt = None
        for epoch in range(first_epoch, n_epochs):
            if phase == "folded" and epoch == n_epochs - 1 and n_epochs > 1:
                for m in (run.model, run.eval_model):
                    m.freeze_ranges(True)
            rec = _train_epoch(run, epoch, s, device, f"{phase} epoch {epoch + 1}/{n_epochs}", progress)
            rec.update(phase=phase, epoch=epoch, lr=run.optimizer.param_groups[0]["lr"],
                       test_acc=evaluate(run.eval_model, eval_loader, device))
            rec["world_size"] = dist.world
            if main:
                append_jsonl(out_dir / "metrics.jsonl", rec)
            log.info("%s epoch %d/%d loss %.4f train %.2f test %.2f (%.0fs)", phase, epoch + 1, n_epochs,
                     rec["loss"], rec["train_acc"], rec["test_acc"], rec["seconds"])
            if on_epoch:
                on_epoch(rec)
            save_after_epoch(checkpoint, phase, epoch + 1, run.state_dict(), metrics, identity, batch)
        net = run.eval_model
        metrics.update(_phase_end(phase, net, arch, out_dir, eval_loader, device, main))
    if s.quantized and not isinstance(net, FoldedNet):  # fold_epochs == 0: fold and calibrate only
        net = _folded_from(net, None, data, s, device, batch * dist.world)
    metrics.update(_finish(net, arch, eval_loader, out_dir, s, device))
    metrics["settings"] = asdict(s)
    if main:
        atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def _phase_end(phase: str, net: nn.Module, arch: Arch, out_dir: Path, eval_loader, device: torch.device,
               main: bool) -> dict:
    """Accuracies measured when a phase ends (and, after the BN phase, its model for `quantize compare`)."""
    if phase == "float":
        return {"acc_float": evaluate(net, eval_loader, device)}
    if phase != "bn":
        return {}
    if main:  # before folding
        save_state(out_dir / "model_bn.safetensors", net, arch, "bn")
    out = {"acc_fake_quant_bn": evaluate(net, eval_loader, device)}
    set_quantization(net, False)
    out["acc_float_of_qat_weights"] = evaluate(net, eval_loader, device)
    set_quantization(net, True)
    return out


def _folded_from(net: nn.Module, ckpt: Optional[dict], data: DataBundle, s: TrainSettings,
                 device: torch.device, batch_size: int) -> FoldedNet:
    """Fold the BN of the phase-1 model (or rebuild the folded model a checkpoint holds) and calibrate."""
    if ckpt is not None:
        folded = fold_model(build_model(net.arch).to(device), s.rounding).to(device)
        set_act_clipping(folded, s.act_clip)
        return folded  # weights and ranges come from the checkpoint
    net.eval()
    folded = fold_model(net, s.rounding).to(device)
    set_act_clipping(folded, s.act_clip)
    # every rank calibrates on the same (global) batches: the same ranges on every rank
    loader = make_loader(data.train, batch_size, shuffle=True, seed=s.seed + 100, device=device)
    folded.calibrate(x for i, (x, _) in zip(range(s.calib_batches), loader))
    return folded


def _finish(model: nn.Module, arch: Arch, eval_loader, out_dir: Path, s: TrainSettings,
            device: torch.device) -> dict:
    out: dict = {}
    if isinstance(model, FoldedNet):
        model.eval()
        integer = to_integer(model).to(device)
        out["acc_fake_quant"] = evaluate(model, eval_loader, device)
        p_fake, p_int = predictions(model, eval_loader, device), predictions(integer, eval_loader, device)
        out["acc_integer"] = evaluate(integer, eval_loader, device)
        out["integer_vs_fake_top1_disagreements"] = int(distributed.current().sum(int((p_fake != p_int).sum()))[0])
        if distributed.current().is_main:
            save_state(out_dir / "model.safetensors", model, arch, "folded", {"rounding": s.rounding})
            save_integer(out_dir, integer)
    elif distributed.current().is_main:
        save_state(out_dir / "model.safetensors", model, arch, "float")
    out.update(size_kb=arch.size_kb(), bops=arch.bops(), macs=arch.macs())
    return out

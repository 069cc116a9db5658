"""Several processes, one search or training: torch.distributed under torchrun (or any launcher that sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

- The process group comes from the environment (`init_from_env`): NCCL for CUDA tensors and gloo for CPU tensors
  (one group, `cpu:gloo,cuda:nccl`), with a timeout on the rendezvous and on every collective.
- Gradients are averaged with `torch.distributed.all_reduce` on one flat buffer per step (`Dist.sync`), not by
  wrapping the supernet in DistributedDataParallel: every rank runs the same sampled path (same Gumbel noise from
  the same seeded CPU generator, same lagged logits), so the parameters that have a gradient are the same on
  every rank and only those are reduced; the ops that did not run keep no gradient (as in one process, so SGD
  skips them) without `find_unused_parameters`' graph walk. Float buffers move with the step: BatchNorm
  statistics are averaged, activation ranges take the max (min) over ranks (the range of the global batch).
- Data: every rank draws the same seeded order of the whole split and takes its stride of each global batch
  (`data.TensorBatches(shard=...)`, the split DistributedSampler makes); DataLoader data (ImageFolder) use
  torch's DistributedSampler itself.
- Rank 0 alone writes (checkpoints, metrics, arch.json, wandb); an error every rank must see is agreed on
  (`Dist.agree`) and printed once.
"""
from __future__ import annotations

import datetime
import logging
import operator
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from .errors import ConfigError, DistributedError

log = logging.getLogger("fbnas")
DEFAULT_TIMEOUT_S = 300.0
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether a launcher (torchrun, srun with the variables set, ...) started this process as one rank of many."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE"))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


@dataclass
class Dist:
    """This process's place in the job. `active`: a process group is up (also with one rank: the collectives run,
    so a world size of 1 measures their cost); inactive = a plain single-process run, every method a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    # sum over steps of |gradients counted over ranks - expected|, on the device; read by check_paths (per epoch)
    path_mismatch: Optional[torch.Tensor] = field(default=None, repr=False)
    _flat_buffers: dict = field(default_factory=dict, repr=False)  # id(module) -> FlatBuffers

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives (errors -> one line)
    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # gloo / NCCL: a peer closed the connection or the timeout passed
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise DistributedError(f"rank {self.rank} of {self.world}: lost the other ranks during {what} ({first}); "
                                   "another rank failed or was killed, or took longer than "
                                   f"dist_timeout_s={self.timeout_s:g}") from None

    def all_reduce_(self, t: torch.Tensor, op=None, what: str = "an all-reduce") -> torch.Tensor:
        import torch.distributed as td

        if self.active:
            self._collective(what, td.all_reduce, t, op=op or td.ReduceOp.SUM)
        return t

    def sum(self, *values) -> list[float]:
        """Sums over ranks of numbers (floats, ints or 0-dim tensors), as floats; one collective."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return [float(v) for v in self.all_reduce_(t, what="the reduction of metrics")]

    def mean_of(self, record: dict, keys: Iterable[str]) -> dict:
        """`record` with the numbers under `keys` averaged over ranks (the epoch's training statistics)."""
        keys = [k for k in keys if isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)]
        if not self.active or not keys:
            return record
        sums = self.sum(*(record[k] for k in keys))
        return {**record, **{k: s / self.world for k, s in zip(keys, sums)}}

    def agree(self, error: Optional[str]) -> None:
        """Every rank calls this at the same point with its own error text (or None). If any rank has one, every
        rank raises the same one-line error (the first rank's), printed by rank 0 only."""
        if not self.active:
            if error is not None:
                raise DistributedError(error)
            return
        import torch.distributed as td

        errors: list = [None] * self.world
        self._collective("a start-up check", td.all_gather_object, errors, error)
        for r, e in enumerate(errors):
            if e is not None:
                exc = DistributedError(e if r == self.rank or self.world == 1 else f"rank {r}: {e}")
                exc.printed_by_rank0 = True
                raise exc

    def broadcast_object(self, obj):
        import torch.distributed as td

        if not self.active:
            return obj
        box = [obj]
        self._collective("a broadcast", td.broadcast_object_list, box, src=0)
        return box[0]

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (the start of a run)."""
        import torch.distributed as td

        if not self.active:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                self._collective("the broadcast of the initial weights", td.broadcast, t.data, src=0)

    def check_same(self, t: torch.Tensor, what: str) -> None:
        """Refuse to go on if `t` differs between ranks (max and -min over ranks must equal this rank's)."""
        import torch.distributed as td

        if not self.active:
            return
        t = t.detach().double().flatten()
        both = torch.cat([t, -t])
        reduced = self.all_reduce_(both.clone(), op=td.ReduceOp.MAX, what=f"the check of the {what}")
        if not torch.equal(reduced, both):
            raise DistributedError(f"rank {self.rank}: the {what} differ between ranks (max |difference| "
                                   f"{float((reduced[:len(t)] + reduced[len(t):]).max()):.3g}); the ranks no longer run "
                                   "the same search")

    def check_paths(self) -> None:
        """Stop if, in a step since the last check, the ranks computed gradients for different parameters (their
        sampled paths differed): one host read, where a per-step read would stall a GPU in every step."""
        mismatch, self.path_mismatch = self.path_mismatch, None
        if mismatch is not None and float(mismatch) != 0:
            raise DistributedError(f"rank {self.rank}: the ranks computed gradients for different parameters in some "
                                   "step; their sampled paths differ")

    # ------------------------------------------------------------------ the step
    def sync(self, params: Sequence[nn.Parameter], module: Optional[nn.Module] = None) -> None:
        """After backward: average the gradients of `params` that have one (the same set on every rank: all ranks
        ran the same path; one flat all-reduce, unpacked in multi-tensor kernels) and `module`'s float buffers
        over ranks, where activation ranges (running_min / running_max buffers) take min / max. The buffers are
        all-reduced where they are (FlatBuffers): a supernet has thousands of small ones, and packing them every
        step would cost more host time than the step's own kernels."""
        if not self.active:
            return
        import torch.distributed as td

        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            dtype = grads[0].dtype
            # the number of gradients counted over ranks, sent with them: a guard against ranks that ran
            # different paths, kept on the device (check_paths reads it per epoch)
            count = torch.full((1,), float(len(grads)), device=grads[0].device, dtype=dtype)
            flat = _flatten(grads + [count], dtype)
            self.all_reduce_(flat, what="the gradient all-reduce")
            mismatch = (flat[-1] - len(grads) * self.world).abs()
            self.path_mismatch = mismatch if self.path_mismatch is None else self.path_mismatch + mismatch
            flat.div_(self.world)
            _unflatten_into(flat[:-1], grads)
        if module is None:
            return
        buffers = self._flat_buffers.get(id(module))
        if buffers is None or not buffers.in_place():
            buffers = self._flat_buffers[id(module)] = FlatBuffers(module)
        for flat in buffers.averaged:
            self.all_reduce_(flat, what="the buffer all-reduce").div_(self.world)
        for flat, sign in buffers.extremes:  # max of running_max, min of running_min (the max of its negation)
            flat.mul_(sign)
            self.all_reduce_(flat, op=td.ReduceOp.MAX, what="the activation-range all-reduce").mul_(sign)

    # ------------------------------------------------------------------ devices and batches
    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: CUDA -> cuda:LOCAL_RANK (one GPU per process). Every rank checks together:
        a rank without a GPU stops them all with one line."""
        if not self.active or device.type != "cuda":
            return device
        error = None
        n = torch.cuda.device_count()
        if device.index is None and self.local_rank >= n:
            error = (f"LOCAL_RANK {self.local_rank} has no GPU: this node has {n} CUDA device(s) for more processes; "
                     f"start at most {n} per node (torchrun --nproc_per_node {n}) or pass accelerator=cpu")
        self.agree(error)
        if device.index is None:
            device = torch.device("cuda", self.local_rank)
        torch.cuda.set_device(device)
        return device

    def per_rank_batch(self, batch: int, field: str, checkpoint: Optional[dict]) -> int:
        """The per-rank batch of this run. A resume keeps the checkpoint's global batch (its per-rank batch x its
        world size): the same command on another number of ranks splits it anew; a world size that does not
        divide it, or another global batch, is refused."""
        if checkpoint is None:
            return batch
        c_world = int(checkpoint.get("world_size", 1))
        c_batch = int(checkpoint.get("batch_size", batch))
        c_global = c_batch * c_world
        error = None
        if batch * self.world != c_global and batch != c_batch:
            error = (f"field '{field}'={batch} on {self.world} rank(s) is a global batch of {batch * self.world}, the "
                     f"checkpoint's is {c_global} ({c_batch} per rank x {c_world}); resume with {field}={c_batch} "
                     "(split anew over the ranks)")
        elif batch * self.world != c_global and c_global % self.world:
            error = (f"the checkpoint's global batch {c_global} ({c_batch} per rank x {c_world} ranks) cannot be split "
                     f"over {self.world} ranks; resume on a number of ranks that divides {c_global}")
        self.agree(error)  # the same on every rank; printed once
        if batch * self.world == c_global:
            return batch
        log.info("resuming on %d rank(s): per-rank batch %d (global batch %d as in the checkpoint, made on %d)",
                 self.world, c_global // self.world, c_global, c_world)
        return c_global // self.world


_CURRENT = Dist()


class FlatBuffers:
    """A module's float buffers made views of a few flat tensors (one per kind, device and dtype: averaged ones
    such as BatchNorm statistics, and activation-range ends), so that a sync all-reduces them where they are
    instead of packing and unpacking thousands of small tensors every step. The module keeps using its buffers
    as before (in-place updates land in the flat tensors); `in_place` tells whether they are still these views
    (a `module.to(...)` or a reassignment replaces them, and the caller makes a new FlatBuffers)."""

    def __init__(self, module: nn.Module):
        groups: dict[tuple, list[tuple[nn.Module, str, torch.Tensor]]] = {}
        for m in module.modules():
            for name, b in m._buffers.items():
                if b is not None and b.is_floating_point():
                    extreme = name in ("running_max", "running_min")
                    groups.setdefault((extreme, b.device, b.dtype), []).append((m, name, b))
        slots: list[tuple[dict, str, torch.Tensor]] = []  # (the owner's buffer dict, name, view)
        self.averaged: list[torch.Tensor] = []
        self.extremes: list[tuple[torch.Tensor, torch.Tensor]] = []
        for (extreme, device, dtype), members in groups.items():
            unique = {id(b): (name, b) for _, name, b in members}  # a buffer registered twice is one value
            flat, offsets = _aligned_flat([b for _, b in unique.values()])
            views = {key: flat[o:o + b.numel()].view_as(b) for (key, (_, b)), o in zip(unique.items(), offsets)}
            for m, name, b in members:
                m._buffers[name] = views[id(b)]
                slots.append((m._buffers, name, views[id(b)]))
            if extreme:
                sign = torch.ones_like(flat)
                for (name, b), o in zip(unique.values(), offsets):
                    if name == "running_min":
                        sign[o:o + b.numel()] = -1.0
                self.extremes.append((flat, sign))
            else:
                self.averaged.append(flat)
        self._owners, self._names, self._views = (list(t) for t in zip(*slots)) if slots else ([], [], [])

    def in_place(self) -> bool:
        """Whether the module still holds these views as its buffers (checked at C speed: thousands of them)."""
        return all(map(operator.is_, map(dict.get, self._owners, self._names), self._views))


_ALIGN = 64  # elements: each buffer's view starts 256-byte aligned, as cuDNN's BatchNorm kernels expect


def _aligned_flat(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """One flat tensor holding `tensors`' values, each at an offset that is a multiple of _ALIGN elements (zeros
    between), and the offsets."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() // _ALIGN) * _ALIGN
    flat = torch.zeros(total, device=tensors[0].device, dtype=tensors[0].dtype)
    for t, o in zip(tensors, offsets):
        flat[o:o + t.numel()] = t.detach().reshape(-1)
    return flat, offsets


def _unflatten_views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    from torch._utils import _unflatten_dense_tensors

    return list(_unflatten_dense_tensors(flat, like))


def _flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """One flat `dtype` tensor of `tensors`' values."""
    from torch._utils import _flatten_dense_tensors

    if any(t.dtype != dtype for t in tensors):
        tensors = [t.to(dtype) for t in tensors]
    return _flatten_dense_tensors(tensors)


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy `flat` back into `tensors`, in multi-tensor kernels."""
    parts = _unflatten_views(flat, tensors)
    if any(p.dtype != t.dtype for p, t in zip(parts, tensors)):
        parts = [p.to(t.dtype) for p, t in zip(parts, tensors)]
    torch._foreach_copy_(tensors, parts)


def current() -> Dist:
    return _CURRENT


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> Dist:
    """Join the process group the launcher's environment describes (once per process); without one, the plain
    single-process Dist. An unreachable or silent master is a one-line DistributedError after `timeout_s`."""
    global _CURRENT
    if _CURRENT.active or not launched():
        return _CURRENT
    import torch.distributed as td

    if not timeout_s > 0:
        raise ConfigError(f"field 'dist_timeout_s' must be > 0, got {timeout_s}")
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not (0 <= rank < world):
        raise DistributedError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    missing = [k for k in LAUNCH_ENV if k not in os.environ]
    if missing:
        raise DistributedError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} not: start the ranks with "
                               "torchrun or set every torch.distributed variable")
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    _parent_death_kills_me()
    try:
        td.init_process_group(backend=backend, rank=rank, world_size=world,
                              timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, OSError, socket.error) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DistributedError(f"rank {rank} of {world}: cannot join the process group at {addr}:{port} within "
                               f"dist_timeout_s={timeout_s:g} ({first}); check MASTER_ADDR/MASTER_PORT and that every "
                               "rank was started") from None
    _CURRENT = Dist(rank, world, local_rank, True, timeout_s)
    if rank != 0:
        logging.getLogger("fbnas").setLevel(logging.WARNING)  # rank 0 logs
    return _CURRENT


def shutdown() -> None:
    global _CURRENT
    import torch.distributed as td

    if _CURRENT.active and td.is_initialized():
        td.destroy_process_group()
    _CURRENT = Dist()


def _parent_death_kills_me() -> None:
    """Under torchrun: if the launcher dies (kill -9), its workers die too instead of running on as orphans
    (Linux prctl PR_SET_PDEATHSIG)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not Path("/proc/self").exists():
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before the call
            os._exit(1)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------- the command line

def timeout_from_argv(argv: Sequence[str]) -> float:
    """`dist_timeout_s=<seconds>` of a command line (the process group starts before Hydra reads the config)."""
    for tok in argv:
        if tok.startswith("dist_timeout_s="):
            raw = tok.split("=", 1)[1]
            try:
                return float(raw)
            except ValueError:
                raise ConfigError(f"field 'dist_timeout_s' is {raw!r}; give seconds, e.g. dist_timeout_s=300") from None
    return DEFAULT_TIMEOUT_S


def launch_overrides(argv: list[str]) -> list[str]:
    """Under a launcher, before Hydra starts: join the process group, give every rank the start time of rank 0
    (so `${now:...}` in hydra.run.dir names one directory), and keep ranks other than 0 from writing Hydra's
    files (.hydra/, the job log) there. Returns the overrides to run with."""
    if not launched():
        return argv
    if any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError("-m (a multirun) under torchrun: launch the sweep's jobs with hydra/launcher= and run each "
                          "job's ranks from there, or run one configuration per torchrun")
    d = init_from_env(timeout_from_argv(argv))
    start = d.broadcast_object(datetime.datetime.now())
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("now", lambda pattern: start.strftime(pattern), use_cache=True, replace=True)
    if d.is_main:
        return argv
    return argv + ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]

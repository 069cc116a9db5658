"""Checkpoints of search and train runs. Checkpoints are data: tensors and plain Python values only, read with
`torch.load(weights_only=True)`, so a crafted file can never run code; random-number-generator states are stored
as tensors. A run keeps its checkpoint in <run dir>/checkpoints/last.pt (RunCheckpoint): written atomically,
read back with its format checked, and refused when a start does not match it (resume without a checkpoint, a
fresh start over one)."""
from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import __version__
from .errors import CheckpointError
from .io import atomic_path

LAST = Path("checkpoints") / "last.pt"  # a run's checkpoint, relative to its run directory


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save of plain data, atomically (a temp file next to `path`, fsync, rename)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, fmt: str, what: str = "checkpoint", map_location: Any = "cpu") -> dict:
    """Read a checkpoint of format `fmt` as data only. A file holding Python objects (a pickle payload, or a
    checkpoint of an older fbnas that stored numpy/Python RNG objects) is refused before anything in it runs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused: the {what} holds Python objects, not only tensors and plain values "
                              "(a file from an older fbnas or not from fbnas; it is never unpickled)") from None
    except Exception as exc:  # torch raises many types for a corrupt or truncated file
        raise CheckpointError(f"{path}: cannot read the {what} ({type(exc).__name__}); it is corrupt or not an "
                              "fbnas file: replace it with an intact copy, or (a run's checkpoints/last.pt) delete it to "
                              "start that run afresh") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        got = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(f"{path}: not an fbnas {what} of format {fmt}" + (f" (it is {got})" if got else "")
                              + "; continue it with the fbnas version that wrote it, or start a new run directory")
    return state


def resume_problem(path: Path, resume: bool) -> Optional[str]:
    """Why a run with this `resume` setting cannot start on the checkpoint `path` (None: it can): resume=true
    needs the checkpoint, a fresh start must not overwrite it."""
    if resume and not path.is_file():
        return (f"resume=true but {path} does not exist: nothing to resume; point hydra.run.dir at the run to "
                "continue, or drop resume=true")
    if not resume and path.exists():
        return (f"{path} exists: pass resume=true to continue that run, or choose another hydra.run.dir "
                "(nothing was overwritten)")
    return None


@dataclass(frozen=True)
class RunCheckpoint:
    """The checkpoint of a run directory, of one format: how `fbnas search` and `fbnas train` save and reopen
    theirs. `what` names it in messages (e.g. "search checkpoint")."""

    run_dir: Path
    fmt: str
    what: str

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / LAST

    def save(self, state: dict) -> None:
        """Write `state` atomically, with its format and the fbnas version that wrote it."""
        save_checkpoint(self.path, {"format": self.fmt, "fbnas_version": __version__, **state})

    def load(self, map_location: Any = "cpu") -> dict:
        return load_checkpoint(self.path, self.fmt, self.what, map_location)

    def open(self, resume: bool, map_location: Any = "cpu") -> Optional[dict]:
        """The state to resume from (None for a fresh start), after refusing resume=true without a checkpoint
        and a fresh start over one."""
        problem = resume_problem(self.path, resume)
        if problem:
            raise CheckpointError(problem)
        return self.load(map_location) if resume else None


def rng_state() -> dict:
    """The torch, numpy and Python global RNG states as tensors."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
            "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached),
            "python_version": int(version), "python_internal": torch.tensor(internal, dtype=torch.int64),
            "python_gauss_next": gauss_next}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(("MT19937", state["numpy_keys"].cpu().numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached_gaussian"]))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_internal"].tolist()),
                     state["python_gauss_next"]))

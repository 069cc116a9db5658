"""Checkpoints as data: tensors and plain Python values only, read with `torch.load(weights_only=True)`, so a
crafted file can never run code. Random-number-generator states are stored as tensors."""
from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .io import atomic_path


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
                              "fbnas file") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        got = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(f"{path}: not an fbnas {what} of format {fmt}" + (f" (it is {got})" if got else ""))
    return state


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

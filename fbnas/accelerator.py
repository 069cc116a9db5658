"""The `accelerator` field of the search, train and hessian commands: which torch device a run computes on."""
from __future__ import annotations

import torch

from .errors import ConfigError

ACCELERATORS = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda | cuda:N; a one-line ConfigError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"field 'accelerator' is {name!r} but CUDA is not available; use accelerator=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"field 'accelerator' is {name!r}; use {ACCELERATORS}") from None

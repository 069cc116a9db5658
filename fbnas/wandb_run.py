"""wandb runs of `fbnas search` and `fbnas train` (logger=wandb). A run directory keeps its wandb run id in
`wandb_id.txt`: unique across run directories (sweep jobs named 0, 1, ... included) and stable across resumes, so a
resumed run continues the same wandb run."""
from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

from .config import WandbConfig
from .errors import ConfigError
from .io import atomic_write_text

ID_FILE = "wandb_id.txt"
LOGGERS = ("none", "wandb")


def check_logger(logger: str) -> None:
    if logger not in LOGGERS:
        raise ConfigError(f"field 'logger' is {logger!r}; use {' or '.join(LOGGERS)}")


def run_id(out_dir: str | Path) -> str:
    """The wandb run id of a run directory: read from wandb_id.txt, or made (the directory's name and 8 random
    hex digits) and written there."""
    path = Path(out_dir) / ID_FILE
    if path.is_file():
        saved = path.read_text().strip()
        if saved:
            return saved
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(out_dir).resolve().name)[:48]
    new = f"{label}-{uuid.uuid4().hex[:8]}"
    atomic_write_text(path, new + "\n")
    return new


def start_wandb(w: WandbConfig, out_dir: str | Path, config: dict, job_type: str) -> Any:
    """wandb.init for a run directory: its stable id, resume allowed, files under out_dir."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("logger=wandb needs the wandb package (pip install wandb)") from None
    out = Path(out_dir).resolve()
    return wandb.init(project=w.project, entity=w.entity, mode=w.mode, dir=str(out), config=config,
                      resume="allow", id=run_id(out), name=f"{out.parent.name}/{out.name}", job_type=job_type)

"""What a resume may change: the settings that determine a run's result are compared field by field with the
checkpoint's, and a mismatch is refused naming the fields."""
from __future__ import annotations

import hashlib
from typing import Any, Iterable

import torch

from .errors import CheckpointError


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def mismatched_fields(saved: dict, mine: dict, free: Iterable[str]) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint value, this run's value) for every field that differs, except those under `free`."""
    free = tuple(free)
    a, b = flatten(saved), flatten(mine)
    out = []
    for key in sorted(set(a) | set(b)):
        if key == "" or any(key == f or key.startswith(f + ".") for f in free):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append((key, a.get(key, "<unset>"), b.get(key, "<unset>")))
    return out


def refuse_mismatch(path: Any, what: str, diffs: list[tuple[str, Any, Any]], free: Iterable[str]) -> None:
    if not diffs:
        return
    shown = ", ".join(f"{k}={theirs!r} (now {mine!r})" for k, theirs, mine in diffs[:4])
    more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
    raise CheckpointError(f"{path}: the {what} was made with {shown}{more}; resume with the same settings (free to "
                          f"change: {', '.join(free)}) or start a new run directory")


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' values (a latency matrix, a dataset sample): equal numbers, equal fingerprint."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()

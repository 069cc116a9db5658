"""hessian.json (fbnas-hessian/1): per-group traces, standard errors and HAWQ-V2 sensitivities; and its bar plot.

{"format": "fbnas-hessian/1", "created": ..., "source": {"arch", "weights", "checkpoint"}, "settings": {...},
 "groups": {"layers.3": {"trace_per_param", "se", "rel_se", "n_params", "n_probes", "converged",
                         "omega": {"2": ..., "4": ..., "8": ...}}, ...}}
omega[b] = trace_per_param * ||Q_b(W) - W||^2 summed over the group's conv/linear weights.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from ..errors import ConfigError
from ..io import atomic_path, atomic_write_json, read_json
from .estimator import TraceResult
from .sensitivity import omega_table

HESSIAN_FORMAT = "fbnas-hessian/1"
GROUP_FIELDS = {"trace_per_param": float, "se": float, "rel_se": float, "n_params": int, "n_probes": int,
                "converged": bool}


def hessian_record(result: TraceResult, weights: Mapping[str, Sequence[torch.Tensor]], bits: Sequence[int],
                   source: Mapping[str, Optional[str]], settings: Mapping) -> dict:
    groups = {}
    for name, g in result.groups.items():
        table = omega_table(g.trace_per_param, weights.get(name, []), bits)
        groups[name] = {"trace_per_param": g.trace_per_param, "se": g.se, "rel_se": _finite(g.rel_se),
                        "n_params": g.n_params, "n_probes": g.n_probes, "converged": g.converged,
                        "omega": {str(b): v for b, v in table.items()}}
    return {"format": HESSIAN_FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": dict(source), "settings": {**dict(settings), "method": result.method, "n_hvp": result.n_hvp,
                                                 "seconds": round(result.seconds, 3)},
            "groups": groups}


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None  # JSON has no inf: a trace of exactly 0 with noise has no rel SE


def write_hessian(out_dir: str | Path, record: dict, plot: bool = True,
                  labels: Optional[Mapping[str, str]] = None) -> list[Path]:
    """Write hessian.json (and hessian.png, its bars named by `labels`: group -> text) into out_dir, each
    atomically; returns the paths written."""
    out_dir = Path(out_dir)
    paths = [out_dir / "hessian.json"]
    atomic_write_json(paths[0], record)
    if plot:
        paths.append(out_dir / "hessian.png")
        plot_traces(record, paths[1], labels)
    return paths


def plot_traces(record: dict, path: str | Path, labels: Optional[Mapping[str, str]] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, g in record["groups"].items() if g["n_params"] > 0]
    tr = [record["groups"][n]["trace_per_param"] for n in names]
    se = [record["groups"][n]["se"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4.0))
    colors = ["tab:blue" if record["groups"][n]["converged"] else "tab:orange" for n in names]
    ax.bar(range(len(names)), tr, yerr=se, color=colors, capsize=2)
    labels = labels or {}
    ax.set_xticks(range(len(names)), [labels.get(n, n) for n in names], rotation=90, fontsize=7)
    ax.set_xlabel("layer: op" + (" and bits" if any(n.startswith("layers.") for n in names) else "")
                  if labels else "parameter group")
    ax.set_ylabel("Tr(H) / n: mean Hessian diagonal\nof the CE loss per weight (± SE)")
    if tr and min(tr) > 0:
        ax.set_yscale("log")
    src = record.get("source", {})
    title = src.get("arch") or src.get("checkpoint") or ""
    ax.set_title(f"Hessian trace per parameter {Path(title).name if title else ''} "
                 f"(orange: probe cap before target SE)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def load_hessian(path: str | Path) -> dict:
    """Read and validate a hessian.json; errors name the file and the field."""
    path = Path(path)
    raw = read_json(path, "Hessian file not found; make one with 'fbnas hessian'")
    if not isinstance(raw, dict) or raw.get("format") != HESSIAN_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"{path}: field 'format' is {got!r}; expected {HESSIAN_FORMAT!r}")
    groups = raw.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{path}: field 'groups' must be a non-empty mapping of group name to trace record")
    for name, g in groups.items():
        if not isinstance(g, dict):
            raise ConfigError(f"{path}: field 'groups.{name}' must be an object")
        for key, typ in GROUP_FIELDS.items():
            val = g.get(key)
            ok = isinstance(val, bool) if typ is bool else (isinstance(val, (int, float)) and not isinstance(val, bool))
            if key == "rel_se" and val is None:
                ok = True
            if not ok:
                raise ConfigError(f"{path}: field 'groups.{name}.{key}' must be a {typ.__name__}, got {val!r}")
        om = g.get("omega")
        if not isinstance(om, dict) or not all(k.isdigit() and isinstance(v, (int, float)) for k, v in om.items()):
            raise ConfigError(f"{path}: field 'groups.{name}.omega' must map bit-widths (\"2\", \"4\", ...) to numbers")
    return raw

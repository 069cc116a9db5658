"""`fbnas hessian` as a library call: per-layer traces of a trained child (arch + weights) or of every candidate
op of a search checkpoint, written to hessian.json and hessian.png. No Hydra here: the app passes a config."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..accelerator import resolve_device
from ..checkpoint import load_checkpoint
from ..config import HessianRunConfig  # noqa: F401  (defined with the other configs; part of this module's API)
from ..errors import CheckpointError, ConfigError
from ..search import CHECKPOINT_FORMAT
from .estimator import TraceResult, hutchinson_traces
from .groups import child_groups, supernet_groups
from .penalty import supernet_traces
from .report import hessian_record, write_hessian

log = logging.getLogger("fbnas")


def _load_child(cfg: HessianRunConfig) -> tuple[nn.Module, str]:
    from ..arch import load_arch
    from ..quant.artifacts import load_unfolded

    if not cfg.weights:
        raise ConfigError("field 'weights' is missing: give the child's model_bn.safetensors (a QAT run) or "
                          "model.safetensors (a float run) with arch=")
    arch = load_arch(cfg.arch)
    model = load_unfolded(cfg.weights, arch, cfg.arch)
    return model, arch.space


def _load_supernet(cfg: HessianRunConfig) -> tuple[nn.Module, str, dict]:
    from ..space import load_space
    from ..supernet import Supernet

    path = Path(cfg.checkpoint)
    state = load_checkpoint(path, CHECKPOINT_FORMAT, "search checkpoint")
    if not isinstance(state.get("supernet"), dict) or not isinstance(state.get("space"), str):
        raise CheckpointError(f"{path}: not an fbnas search checkpoint (needs keys 'supernet' and 'space')")
    conf = state.get("config") or {}
    space = load_space(state["space"])
    if "space_bits" in state:  # the bit choices the search offered on its device
        space = space.with_bits(*state["space_bits"])
    net = Supernet(space, mode=conf.get("mode", "soft"), quantized=conf.get("quantized", True))
    try:
        net.load_state_dict(state["supernet"])
    except RuntimeError:
        raise CheckpointError(f"{path}: the supernet weights do not match space {state['space']}") from None
    return net, state["space"], conf


def _dataset_name(cfg: HessianRunConfig, space_name: str, search_conf: dict) -> Optional[str]:
    from ..space import load_space

    return cfg.data.name or (search_conf.get("data") or {}).get("name") or load_space(space_name).dataset or None


def _batches(cfg: HessianRunConfig, space_name: str, search_conf: dict, device: torch.device) -> list:
    from ..data import load_dataset, make_loader
    from ..space import load_space

    data_conf = search_conf.get("data") or {}
    name = _dataset_name(cfg, space_name, search_conf)
    if not name:
        raise ConfigError(f"field 'data.name' is missing: space {space_name!r} has no default dataset; "
                          "give data.name=fashion_mnist|cifar10|cifar100|imagefolder|synthetic")
    space = load_space(space_name)
    bundle = load_dataset(name, cfg.data.root or data_conf.get("root"), seed=cfg.seed,
                          input_size=space.input_size, num_classes=space.num_classes, in_channels=space.in_channels)
    loader = make_loader(bundle.train, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True)
    out = []
    for x, y in loader:
        out.append((x.to(device), y.to(device)))
        if len(out) == cfg.batches:
            break
    if len(out) < cfg.batches:
        raise ConfigError(f"fields 'batches' x 'batch_size' ({cfg.batches} x {cfg.batch_size}) ask for more "
                          f"images than {name} has ({len(bundle.train)})")
    return out


def _labels(cfg: HessianRunConfig, model: nn.Module) -> dict[str, str]:
    """Plot labels of the groups: layer and op (a child: and its bits)."""
    if cfg.checkpoint:
        ops = model.space.candidates
        return {f"mixed_layers.{l}.ops.{i}": f"{l}: {op}" for l in range(len(model.mixed_layers))
                for i, op in enumerate(ops)}
    from ..arch import load_arch

    return {f"layers.{i}": f"{i}: {layer.op} W{layer.w_bits}A{layer.a_bits}"
            for i, layer in enumerate(load_arch(cfg.arch).layers)}


def run_hessian(cfg: HessianRunConfig) -> tuple[dict, list[Path], TraceResult]:
    """Compute the traces named by cfg and write hessian.json / hessian.png. Returns (record, paths, result)."""
    if bool(cfg.checkpoint) == bool(cfg.arch):
        raise ConfigError("give either checkpoint=<search checkpoint> or arch=<arch.json> weights=<model.safetensors>")
    if cfg.batches < 1 or cfg.batch_size < 1:
        raise ConfigError("fields 'batches' and 'batch_size' must be >= 1")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.accelerator)
    search_conf: dict = {}
    if cfg.checkpoint:
        model, space_name, search_conf = _load_supernet(cfg)
        groups = supernet_groups(model)
        src = Path(cfg.checkpoint).resolve().parent
        default_out = src.parent if src.name == "checkpoints" else src
    else:
        model, space_name = _load_child(cfg)
        groups = child_groups(model)
        default_out = Path(cfg.weights).resolve().parent
    model.to(device)
    bits = cfg.bits
    if not bits:
        from ..space import load_space

        bits = list(load_space(space_name).w_bits)
    batches = _batches(cfg, space_name, search_conf, device)
    kw = dict(target_rel_se=cfg.target_rel_se, max_probes=cfg.max_probes, min_probes=cfg.min_probes,
              seed=cfg.seed, method=cfg.method, device=device)
    if cfg.checkpoint:
        result = supernet_traces(model, None, batches, **kw)
    else:
        result = hutchinson_traces(model, None, batches, groups, **kw)
    settings = {"target_rel_se": cfg.target_rel_se, "max_probes": cfg.max_probes, "min_probes": cfg.min_probes,
                "seed": cfg.seed, "batches": cfg.batches, "batch_size": cfg.batch_size,
                "dataset": _dataset_name(cfg, space_name, search_conf), "device": str(device),
                "bits": [int(b) for b in bits]}
    source = {"arch": cfg.arch, "weights": cfg.weights, "checkpoint": cfg.checkpoint}
    record = hessian_record(result, groups, bits, source, settings)
    paths = write_hessian(cfg.out_dir or default_out, record, plot=cfg.plot, labels=_labels(cfg, model))
    return record, paths, result

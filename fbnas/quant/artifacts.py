"""Files of a quantized model: the folded fake-quant weights (model.safetensors), the integer-only tensors
(integer.safetensors), a readable summary of every quantization parameter (quant_params.json), and the
loading of supernet weights into a child network."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..arch import Arch, arch_from_dict
from ..errors import CheckpointError, ConfigError
from ..io import atomic_path, atomic_write_json
from ..model import build_model
from .fold import FoldedNet, fold_model
from .integer import IntConv, IntegerNet, IntInput, IntLinear, IntMerge, IntPool

WEIGHTS_FORMAT = "fbnas-weights/1"


def save_state(path: str | Path, module: nn.Module, arch: Arch, kind: str, extra: Optional[dict] = None) -> None:
    """state_dict -> safetensors (atomic), with the arch and kind in the metadata."""
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in module.state_dict().items()}
    meta = {"format": WEIGHTS_FORMAT, "kind": kind, "arch": json.dumps(arch.to_dict())}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = dict(fh.metadata() or {})
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:120]}); "
                              "re-export it or point to the right file") from None


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str, arch_source: str) -> None:
    """load_state_dict with one-line errors that say the weights and the architecture do not match."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        what = f"lacks tensor {missing[0]!r}" if missing else f"has unexpected tensor {extra[0]!r}"
        raise CheckpointError(f"{source}: weights do not match the architecture {arch_source}: the file {what} "
                              f"({len(missing)} missing, {len(extra)} unexpected)")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: weights do not match the architecture {arch_source}: tensor {k!r} has "
                                  f"shape {tuple(state[k].shape)}, the architecture needs {tuple(v.shape)}")
    module.load_state_dict(state)


def stored_arch(weights: str | Path, meta: dict) -> Arch:
    """The architecture a weights file carries in its metadata."""
    if "arch" not in meta:
        raise CheckpointError(f"{weights}: no architecture stored in the file; pass arch=<arch.json>")
    return arch_from_dict(json.loads(meta["arch"]), f"{weights}:metadata.arch")


def load_folded(weights: str | Path, arch: Optional[Arch] = None, arch_source: str = "") -> FoldedNet:
    """Rebuild the folded fake-quant model of `arch` (or the arch stored in the file) and load its weights."""
    state, meta = read_state(weights)
    if meta.get("kind") not in (None, "folded"):
        raise CheckpointError(f"{weights}: holds a {meta.get('kind')!r} model, not a folded fake-quant model "
                              "(use the model.safetensors of a finished `fbnas train` run)")
    if arch is None:
        arch = stored_arch(weights, meta)
        arch_source = arch_source or f"stored in {weights}"
    folded = fold_model(build_model(arch))
    load_into(folded, state, str(weights), arch_source or "given")
    folded.set_rounding(meta.get("rounding", "half_even"))
    folded.eval()
    return folded


def quant_params(model: IntegerNet) -> dict:
    """Every integer node's parameters in readable form (scales, multipliers, shifts, ranges, bits)."""
    nodes = {}
    for st in model.steps:
        key = st.name.replace(".", "/")
        if key not in model.nodes:
            continue
        n = model.nodes[key]
        rec: dict = {"kind": st.kind, "inputs": list(st.inputs)}
        if isinstance(n, IntInput):
            rec.update(scale=float(n.scale), range=[n.lo, n.hi])
        if isinstance(n, IntConv):
            rec.update(weight_shape=list(n.weight.shape), weight_range=[int(n.weight.min()), int(n.weight.max())],
                       input_offset=n.offset)
            if isinstance(n, IntLinear):
                rec["dequant_scale"] = [float(s) for s in n.deq_scale]
            elif not n.raw:
                rec.update(m=n.m.tolist(), c=n.c.tolist(), range=[n.lo, n.hi])
            else:
                rec["raw_accumulator"] = True
        if isinstance(n, IntMerge):
            rec.update(relu=list(n.relus), range=[n.lo, n.hi],
                       m=[getattr(n, f"m{i}").tolist() for i in range(len(st.inputs))],
                       c=[getattr(n, f"c{i}").tolist() for i in range(len(st.inputs))])
        if isinstance(n, IntPool):
            rec.update(m=int(n.m), c=int(n.c), range=[n.lo, n.hi])
        if st.output in model.scales:
            s = model.scales[st.output]
            rec["output_scale"] = float(s) if s.dim() == 0 else [float(v) for v in s]
        nodes[st.name] = rec
    return {"format": "fbnas-quant-params/1", "rounding": model.rounding, "nodes": nodes}


def save_integer(out_dir: str | Path, model: IntegerNet) -> None:
    out_dir = Path(out_dir)
    save_state(out_dir / "integer.safetensors", model, model.arch, "integer", {"rounding": model.rounding})
    atomic_write_json(out_dir / "quant_params.json", quant_params(model))


# --------------------------------------------------------------------------------- supernet weights

def load_supernet_into(net: nn.Module, arch: Arch, checkpoint: str | Path) -> None:
    """Copy a search checkpoint's supernet weights into the child: layers.{l}.* <- mixed_layers.{l}.ops.{i}.*
    with i the index of the layer's op among the space's candidates; stem.* and head.* unchanged."""
    from ..space import load_space

    from ..checkpoint import load_checkpoint
    from ..search import CHECKPOINT_FORMAT

    path = Path(checkpoint)
    ckpt = load_checkpoint(path, CHECKPOINT_FORMAT, "search checkpoint (field 'supernet')")
    sd = ckpt.get("supernet")
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: no 'supernet' state_dict in the checkpoint")
    if not arch.space:
        raise ConfigError("arch.json: field 'space' is empty; init=supernet needs the space to map ops")
    candidates = list(load_space(arch.space).candidates)
    mapped = {}
    for k, v in sd.items():
        if k.startswith(("stem.", "head.")):
            mapped[k] = v
    for l, choice in enumerate(arch.layers):
        if choice.op not in candidates:
            raise ConfigError(f"arch.json: field 'layers[{l}].op' ({choice.op}) is not a candidate of space "
                              f"{arch.space}; cannot take its supernet weights")
        prefix = f"mixed_layers.{l}.ops.{candidates.index(choice.op)}."
        for k, v in sd.items():
            if k.startswith(prefix):
                mapped[f"layers.{l}.{k[len(prefix):]}"] = v
    load_into(net, mapped, str(path), f"{arch.space} child")


def _read_unfolded(weights: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state, meta = read_state(weights)
    if meta.get("kind") not in (None, "bn", "float"):
        raise CheckpointError(f"{weights}: holds a {meta.get('kind')!r} model, not an unfolded (BN) model; use "
                              f"{Path(weights).with_name('model_bn.safetensors')} of the same `fbnas train` run")
    return state, meta


def load_unfolded_into(net: nn.Module, arch: Arch, weights: str | Path) -> None:
    """Initialise a child from an unfolded model of the same ops and channels at any bits (e.g. the mixed-bit
    version of a trained W8A8 or FP32 model). Activation ranges come along; they do not depend on the bits."""
    state, meta = _read_unfolded(weights)
    if "arch" in meta:
        theirs = stored_arch(weights, meta)
        mine = [(l.op, l.channels, l.stride) for l in arch.layers]
        if [(l.op, l.channels, l.stride) for l in theirs.layers] != mine:
            raise CheckpointError(f"{weights}: its architecture has other ops or channels than the one being trained "
                                  "(field 'weights' must come from the same ops; only the bits may differ)")
    load_into(net, state, str(weights), "being trained")


def load_unfolded(weights: str | Path, arch: Optional[Arch] = None, arch_source: str = "") -> nn.Module:
    """Rebuild the unfolded (BN) fake-quant FbnasNet of a phase-1 file (model_bn.safetensors)."""
    state, meta = _read_unfolded(weights)
    if arch is None:
        arch = stored_arch(weights, meta)
    net = build_model(arch, quantized=meta.get("kind") != "float")
    load_into(net, state, str(weights), arch_source or "stored in the file")
    return net.eval()

"""Dump-and-compare: every tensor of the integer-only model against the folded fake-quant model (exact
integer-domain equality, to bisect a mismatch to the first node that differs), and every block output against
the naive fake-quant model (float BN and float residuals) as a relative L2 error."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .fold import FoldedNet
from .integer import IntegerNet


def _block_modules(net: nn.Module) -> dict[str, nn.Module]:
    mods = {"stem": net.stem}
    mods.update({f"layers.{i}": layer for i, layer in enumerate(net.layers)})
    mods.update({"head.conv": net.head.conv, "head.pool": net.head.pool})
    return mods


@torch.no_grad()
def naive_block_outputs(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Block outputs of an unfolded FbnasNet (fake quant at conv inputs, float BN and residuals)."""
    out, hooks = {}, []
    for name, mod in _block_modules(net).items():
        hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: out.__setitem__(name, o.detach())))
    net.eval()
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    out["head.pool"] = out["head.pool"].flatten(1)
    return out


@torch.no_grad()
def compare_models(folded: FoldedNet, integer: IntegerNet, x: torch.Tensor,
                   naive: Optional[nn.Module] = None) -> dict:
    """{"nodes": [{name, elements, mismatches, max_abs_diff}], "blocks": [{block, rel_l2_naive_vs_integer}],
    "first_mismatch": name or None, "logits_max_abs_diff": float}."""
    folded.eval()
    integer.eval()
    rec_f, rec_i = {}, {}
    lf = folded(x, record=rec_f)
    li = integer(x.to(next(integer.buffers()).device), record=rec_i)
    nodes, first = [], None
    for st in integer.steps:
        if st.kind == "linear" or st.output not in rec_i:
            continue
        qi = rec_i[st.output].cpu().to(torch.int64)
        qf = rec_f[st.output][0].cpu()
        diff = (qf - qi.to(qf.dtype)).abs()
        n_bad = int((diff > 0).sum())
        if n_bad and first is None:
            first = st.output
        nodes.append({"name": st.output, "kind": st.kind, "elements": qi.numel(), "mismatches": n_bad,
                      "max_abs_diff": float(diff.max()) if diff.numel() else 0.0})
    result = {"nodes": nodes, "first_mismatch": first,
              "logits_max_abs_diff": float((lf.cpu() - li.cpu()).abs().max()), "blocks": []}
    if naive is not None:
        ref = naive_block_outputs(naive, x)
        for block, slot in integer.blocks.items():
            deq = rec_i[slot].cpu().double() * _scale_view(integer.scales[slot], rec_i[slot])
            r = ref[block].cpu().double()
            result["blocks"].append({"block": block,
                                     "rel_l2_naive_vs_integer": float((deq - r).norm() / r.norm().clamp_min(1e-30))})
    return result


def _scale_view(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    s = s.cpu().double()
    return s.view((1, -1) + (1,) * (like.dim() - 2)) if s.dim() == 1 else s


def format_comparison(result: dict) -> str:
    lines = ["| tensor | kind | elements | mismatches | max abs diff |", "|---|---|---:|---:|---:|"]
    lines += [f"| {n['name']} | {n['kind']} | {n['elements']} | {n['mismatches']} | {n['max_abs_diff']:g} |"
              for n in result["nodes"]]
    if result["blocks"]:
        lines += ["", "| block | rel. L2, naive fake quant vs integer-only |", "|---|---:|"]
        lines += [f"| {b['block']} | {b['rel_l2_naive_vs_integer']:.4g} |" for b in result["blocks"]]
    lines += ["", f"first mismatching tensor: {result['first_mismatch'] or 'none'}; "
                  f"logits max |diff| {result['logits_max_abs_diff']:g}"]
    return "\n".join(lines)


@torch.no_grad()
def naive_vs_integer(bn_net: nn.Module, bits: Optional[int], calib: list[torch.Tensor], x: torch.Tensor,
                     rounding: str = "half_even") -> dict:
    """Fold an unfolded QAT model (optionally re-quantized at `bits` for weights and activations: its EMA ranges
    stay valid), calibrate the folded model, derive the integer model, and compare all three on x."""
    from ..model import build_model
    from .fold import fold_model
    from .integer import to_integer

    net = bn_net
    if bits:
        net = build_model(bn_net.arch.with_bits(bits, bits))
        net.load_state_dict(bn_net.state_dict())
    net.eval()
    folded = fold_model(net, rounding)
    folded.calibrate(calib)
    folded.eval()
    return compare_models(folded, to_integer(folded), x, naive=net)

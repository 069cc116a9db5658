"""Parameter groups for the trace estimator, named as in hessian.json (fbnas-hessian/1).

A child network (FbnasNet): `stem`, `layers.{i}` (every conv weight of searchable layer i; an identity layer has
none), `head` (head conv + classifier weight). A supernet: `mixed_layers.{l}.ops.{i}` (the conv weights of
candidate i of layer l), for the candidates that have weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..quant.fake import QConv2d, QLinear


def quantized_weights(module: nn.Module) -> list[torch.Tensor]:
    """The weights of every conv and linear layer under `module` (the tensors that get quantized)."""
    return [m.weight for m in module.modules() if isinstance(m, (QConv2d, QLinear, nn.Conv2d, nn.Linear))]


def child_groups(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    groups = {"stem": quantized_weights(model.stem)}
    for i, layer in enumerate(model.layers):
        groups[f"layers.{i}"] = quantized_weights(layer)
    groups["head"] = quantized_weights(model.head)
    return groups


def supernet_groups(supernet: nn.Module) -> dict[str, list[torch.Tensor]]:
    groups = {}
    for l, layer in enumerate(supernet.mixed_layers):
        for i, op in enumerate(layer.ops):
            ws = quantized_weights(op)
            if ws:
                groups[f"mixed_layers.{l}.ops.{i}"] = ws
    return groups


def group_weights(model: nn.Module, name: str) -> list[torch.Tensor]:
    """The weights of one named group of a child network or a supernet."""
    if name.startswith("mixed_layers."):
        _, l, _, i = name.split(".")
        return quantized_weights(model.mixed_layers[int(l)].ops[int(i)])
    return child_groups(model)[name]

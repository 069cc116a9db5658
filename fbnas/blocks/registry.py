"""The op registry: op name -> OpDef (module builder, fused-kernel description, integer lowering, shape check)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.nn as nn

from ..errors import ConfigError
from ..quant.bits import BitState
from .kernels import KernelSpec

Builder = Callable[[int, int, int, BitState], nn.Module]  # (c_in, c_out, stride, bit_state) -> module
KernelFn = Callable[[int, int, int, int, int], list]  # (c_in, c_out, stride, h, w) -> list[KernelSpec]
# (program builder, the built module, its name, input tensor name, LayerBits) -> output tensor name;
# see fbnas/quant/fold.py (ProgramBuilder, LayerBits)
LowerFn = Callable[[Any, nn.Module, str, str, Any], str]
CheckFn = Callable[[int, int, int], Optional[str]]  # (c_in, c_out, stride) -> why it cannot, or None


@dataclass(frozen=True)
class OpDef:
    """One candidate op: how to build it, what it costs (fused kernels), and how it runs integer-only."""

    name: str
    family: str  # mobilenetv2 | squeezenext | shufflenetv2 | skip | ...
    build: Builder
    kernels: KernelFn
    lower: LowerFn
    check: CheckFn = field(default=lambda c_in, c_out, stride: None)
    params: dict = field(default_factory=dict)


_REGISTRY: dict[str, OpDef] = {}


def register_op(op: OpDef) -> OpDef:
    if op.name in _REGISTRY:
        raise ValueError(f"op {op.name!r} registered twice")
    _REGISTRY[op.name] = op
    return op


def known_ops() -> list[str]:
    return sorted(_REGISTRY)


def is_known_op(name: str) -> bool:
    return name in _REGISTRY


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown op {name!r}; known ops: {', '.join(known_ops())}") from None


def check_op_shape(name: str, c_in: int, c_out: int, stride: int) -> Optional[str]:
    return get_op(name).check(c_in, c_out, stride)


def build_op(name: str, c_in: int, c_out: int, stride: int, bit_state: Optional[BitState] = None) -> nn.Module:
    op = get_op(name)
    problem = op.check(c_in, c_out, stride)
    if problem:
        raise ConfigError(f"op {name!r} cannot map {c_in}->{c_out} channels at stride {stride}: {problem}")
    return op.build(c_in, c_out, stride, bit_state if bit_state is not None else BitState.float())


def op_kernels(name: str, c_in: int, c_out: int, stride: int, h: int, w: int) -> list[KernelSpec]:
    return get_op(name).kernels(c_in, c_out, stride, h, w)

"""skip: identity, or a 1x1 conv+BN+ReLU where channels or stride change (then it has a real cost)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from ..quant.bits import BitState
from ..quant.fake import ConvBNAct
from .kernels import KernelSpec, conv
from .registry import OpDef, register_op

if TYPE_CHECKING:  # the lowering only calls the builder it is given; fold.py looks lowerings up here
    from ..quant.fold import LayerBits, ProgramBuilder


def _is_identity(c_in: int, c_out: int, stride: int) -> bool:
    return stride == 1 and c_in == c_out


def _build(c_in: int, c_out: int, stride: int, bit_state: BitState) -> nn.Module:
    if _is_identity(c_in, c_out, stride):
        return nn.Identity()
    return ConvBNAct(c_in, c_out, 1, stride=stride, bit_state=bit_state)


def _kernels(c_in: int, c_out: int, stride: int, h: int, w: int) -> list[KernelSpec]:
    if _is_identity(c_in, c_out, stride):
        return []
    return [conv("pw", c_in, c_out, h, w, 1, stride)]


def _lower(b: ProgramBuilder, blk: nn.Module, name: str, src: str, bits: LayerBits) -> str:
    if isinstance(blk, nn.Identity):
        return src
    return b.conv(name, blk, src, bits.w, bits.out)


register_op(OpDef(name="skip", family="skip", build=_build, kernels=_kernels, lower=_lower))

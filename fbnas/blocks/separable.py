"""Depthwise-separable conv (sep_k{k}, MnasNet's SepConv and the first block of timm's mnasnet/efficientnet):
kxk depthwise + BN + ReLU, 1x1 pointwise + BN (linear), residual when stride 1 and C_in == C_out."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from ..quant.bits import BitState
from ..quant.fake import ConvBNAct
from .kernels import KernelSpec, conv, conv_out_size
from .registry import OpDef, register_op

if TYPE_CHECKING:  # the lowering only calls the builder it is given; fold.py looks lowerings up here
    from ..quant.fold import LayerBits, ProgramBuilder


class SeparableConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int, bit_state: BitState):
        super().__init__()
        self.dw = ConvBNAct(c_in, c_in, kernel, stride=stride, groups=c_in, bit_state=bit_state)
        self.pw = ConvBNAct(c_in, c_out, 1, act=False, bit_state=bit_state)
        self.has_residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.pw(self.dw(x))
        return x + y if self.has_residual else y


def sep_kernels(c_in: int, c_out: int, stride: int, h: int, w: int, kernel: int) -> list[KernelSpec]:
    ho, wo = conv_out_size(h, stride), conv_out_size(w, stride)
    ks = [conv("dw", c_in, c_in, h, w, kernel, stride, c_in),
          conv("pw", c_in, c_out, ho, wo, act=False)]
    if stride == 1 and c_in == c_out:
        ks.append(KernelSpec("add", c_out, c_out, ho, wo, quantized=False))
    return ks


def lower_separable(b: ProgramBuilder, blk: SeparableConv, name: str, src: str, bits: LayerBits) -> str:
    t = b.conv(f"{name}.dw", blk.dw, src, bits.w, bits.a)
    if blk.has_residual:
        y = b.conv(f"{name}.pw", blk.pw, t, bits.w, None)
        return b.merge("add", f"{name}.add", (src, y), bits.out)
    return b.conv(f"{name}.pw", blk.pw, t, bits.w, bits.out)


for _k in (3, 5):
    register_op(OpDef(
        name=f"sep_k{_k}", family="mnasnet",
        build=lambda ci, co, s, bs, k=_k: SeparableConv(ci, co, s, k, bs),
        kernels=lambda ci, co, s, h, w, k=_k: sep_kernels(ci, co, s, h, w, k),
        lower=lower_separable,
        params={"kernel": _k},
    ))

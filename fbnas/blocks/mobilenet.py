"""MobileNetV2 inverted residual (FBNet's ir_k{k}_e{e}[_g2]): 1x1 (groups g) expand, [shuffle], kxk depthwise,
1x1 (groups g) project, residual when stride 1 and C_in == C_out. The first 1x1 exists even at e=1."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from ..quant.bits import BitState
from ..quant.fake import ConvBNAct
from .kernels import KernelSpec, conv, conv_out_size
from .registry import OpDef, register_op

if TYPE_CHECKING:  # the lowering only calls the builder it is given; fold.py looks lowerings up here
    from ..quant.fold import LayerBits, ProgramBuilder


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int, expansion: int, groups: int,
                 bit_state: BitState):
        super().__init__()
        mid = c_in * expansion
        self.pw = ConvBNAct(c_in, mid, 1, groups=groups, bit_state=bit_state)
        self.shuffle = nn.ChannelShuffle(groups) if groups > 1 else nn.Identity()
        self.dw = ConvBNAct(mid, mid, kernel, stride=stride, groups=mid, bit_state=bit_state)
        self.pwl = ConvBNAct(mid, c_out, 1, groups=groups, act=False, bit_state=bit_state)
        self.has_residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.pwl(self.dw(self.shuffle(self.pw(x))))
        return x + y if self.has_residual else y


def ir_kernels(c_in: int, c_out: int, stride: int, h: int, w: int, kernel: int, expansion: int,
               groups: int) -> list[KernelSpec]:
    mid = c_in * expansion
    ho, wo = conv_out_size(h, stride), conv_out_size(w, stride)
    ks = [conv("pw", c_in, mid, h, w, 1, 1, groups)]
    if groups > 1:
        ks.append(KernelSpec("shuffle", mid, mid, h, w, quantized=False))
    ks.append(conv("dw", mid, mid, h, w, kernel, stride, mid))
    ks.append(conv("pw", mid, c_out, ho, wo, 1, 1, groups, act=False))
    if stride == 1 and c_in == c_out:
        ks.append(KernelSpec("add", c_out, c_out, ho, wo, quantized=False))
    return ks


def lower_inverted_residual(b: ProgramBuilder, blk: InvertedResidual, name: str, src: str, bits: LayerBits) -> str:
    t = b.conv(f"{name}.pw", blk.pw, src, bits.w, bits.a)
    if isinstance(blk.shuffle, nn.ChannelShuffle):
        t = b.shuffle(f"{name}.shuffle", t, blk.shuffle.groups)
    t = b.conv(f"{name}.dw", blk.dw, t, bits.w, bits.a)
    if blk.has_residual:
        y = b.conv(f"{name}.pwl", blk.pwl, t, bits.w, None)
        return b.merge("add", f"{name}.add", (src, y), bits.out)
    return b.conv(f"{name}.pwl", blk.pwl, t, bits.w, bits.out)


def _ir_check(groups: int):
    def check(c_in: int, c_out: int, stride: int):
        if groups > 1 and (c_in % groups or c_out % groups):
            return f"grouped 1x1 convs need channels divisible by {groups}"
        return None
    return check


def _register() -> None:
    for k in (3, 5, 7):
        for e in (1, 3, 6):
            for g in (1, 2):
                name = f"ir_k{k}_e{e}" + (f"_g{g}" if g > 1 else "")
                register_op(OpDef(
                    name=name, family="mobilenetv2",
                    build=lambda ci, co, s, bs, k=k, e=e, g=g: InvertedResidual(ci, co, s, k, e, g, bs),
                    kernels=lambda ci, co, s, h, w, k=k, e=e, g=g: ir_kernels(ci, co, s, h, w, k, e, g),
                    lower=lower_inverted_residual,
                    check=_ir_check(g),
                    params={"kernel": k, "expansion": e, "groups": g},
                ))


_register()

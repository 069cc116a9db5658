"""ShuffleNetV2 unit (shuffle_k{k}). Stride 1 with C_in == C_out: channel split, the right half through
1x1 - kxk depthwise - 1x1, concat, shuffle. Otherwise (stride 2 or a channel change) no split: a
depthwise+1x1 branch and a 1x1-depthwise-1x1 branch, each giving half of C_out, concat, shuffle."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..quant.bits import BitState
from ..quant.fake import ConvBNAct
from .kernels import KernelSpec, conv, conv_out_size
from .registry import OpDef, register_op

if TYPE_CHECKING:  # the lowering only calls the builder it is given; fold.py looks lowerings up here
    from ..quant.fold import LayerBits, ProgramBuilder


def _split_unit(c_in: int, c_out: int, stride: int) -> bool:
    return stride == 1 and c_in == c_out


class ShuffleUnit(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int, bit_state: BitState):
        super().__init__()
        self.split = _split_unit(c_in, c_out, stride)
        half = c_out // 2
        if self.split:
            self.left = None
            b_in = c_in // 2
        else:
            self.left = nn.Sequential(
                ConvBNAct(c_in, c_in, kernel, stride=stride, groups=c_in, act=False, bit_state=bit_state),
                ConvBNAct(c_in, c_out - half, 1, bit_state=bit_state))
            b_in = c_in
        self.right = nn.Sequential(
            ConvBNAct(b_in, half, 1, bit_state=bit_state),
            ConvBNAct(half, half, kernel, stride=stride, groups=half, act=False, bit_state=bit_state),
            ConvBNAct(half, half, 1, bit_state=bit_state))
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x):
        if self.split:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.right(x2)), dim=1)
        else:
            out = torch.cat((self.left(x), self.right(x)), dim=1)
        return self.shuffle(out)


def shuffle_kernels(c_in: int, c_out: int, stride: int, h: int, w: int, kernel: int) -> list[KernelSpec]:
    half = c_out // 2
    ho, wo = conv_out_size(h, stride), conv_out_size(w, stride)
    ks: list[KernelSpec] = []
    if _split_unit(c_in, c_out, stride):
        b_in = c_in // 2
    else:
        b_in = c_in
        ks += [conv("dw", c_in, c_in, h, w, kernel, stride, c_in, act=False),
               conv("pw", c_in, c_out - half, ho, wo)]
    ks += [conv("pw", b_in, half, h, w),
           conv("dw", half, half, h, w, kernel, stride, half, act=False),
           conv("pw", half, half, ho, wo),
           KernelSpec("concat", c_out, c_out, ho, wo, quantized=False),
           KernelSpec("shuffle", c_out, c_out, ho, wo, quantized=False)]
    return ks


def _lower_branch(b: ProgramBuilder, seq: nn.Sequential, name: str, src: str, bits: LayerBits) -> str:
    t = src
    for i, cba in enumerate(seq):
        last = i == len(seq) - 1
        t = b.conv(f"{name}.{i}", cba, t, bits.w, None if last else bits.a)
    return t


def lower_shuffle_unit(b: ProgramBuilder, blk: ShuffleUnit, name: str, src: str, bits: LayerBits) -> str:
    if blk.split:
        c_in = 2 * blk.right[0].conv.in_channels
        left = b.split(f"{name}.split", src, 0, c_in // 2)
        x2 = b.split(f"{name}.split", src, c_in // 2, c_in)
    else:
        left = _lower_branch(b, blk.left, f"{name}.left", src, bits)
        x2 = src
    right = _lower_branch(b, blk.right, f"{name}.right", x2, bits)
    cat = b.merge("concat", f"{name}.concat", (left, right), bits.out)
    return b.shuffle(f"{name}.shuffle", cat, 2)


def _check(c_in: int, c_out: int, stride: int):
    if c_out % 2:
        return "a ShuffleNetV2 unit needs an even number of output channels"
    if _split_unit(c_in, c_out, stride) and c_in % 2:
        return "the channel split needs an even number of input channels"
    return None


for _k in (3, 5):
    register_op(OpDef(
        name=f"shuffle_k{_k}", family="shufflenetv2",
        build=lambda ci, co, s, bs, k=_k: ShuffleUnit(ci, co, s, k, bs),
        kernels=lambda ci, co, s, h, w, k=_k: shuffle_kernels(ci, co, s, h, w, k),
        lower=lower_shuffle_unit,
        check=_check,
        params={"kernel": _k},
    ))

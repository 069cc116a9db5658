"""SqueezeNext block (sqnxt_k{k}): 1x1 squeeze to C_in/2 (carries the stride), 1x1 squeeze to C_in/4,
kx1 to C_in/2, 1xk to C_in/2, 1x1 expand to C_out (linear), plus a residual: identity, or a 1x1 conv+BN
where stride or channels change. The block output is linear (no ReLU after the add), like the other
blocks, so blocks compose the same way in the integer-only model."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from ..quant.bits import BitState
from ..quant.fake import ConvBNAct
from .kernels import KernelSpec, conv, conv_out_size
from .registry import OpDef, register_op

if TYPE_CHECKING:  # the lowering only calls the builder it is given; fold.py looks lowerings up here
    from ..quant.fold import LayerBits, ProgramBuilder


def _widths(c_in: int) -> tuple[int, int]:
    return max(c_in // 2, 1), max(c_in // 4, 1)


class SqueezeNextBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, kernel: int, bit_state: BitState):
        super().__init__()
        half, quarter = _widths(c_in)
        self.squeeze1 = ConvBNAct(c_in, half, 1, stride=stride, bit_state=bit_state)
        self.squeeze2 = ConvBNAct(half, quarter, 1, bit_state=bit_state)
        self.sep_v = ConvBNAct(quarter, half, (kernel, 1), bit_state=bit_state)
        self.sep_h = ConvBNAct(half, half, (1, kernel), bit_state=bit_state)
        self.expand = ConvBNAct(half, c_out, 1, act=False, bit_state=bit_state)
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out
                         else ConvBNAct(c_in, c_out, 1, stride=stride, act=False, bit_state=bit_state))

    def forward(self, x):
        y = self.expand(self.sep_h(self.sep_v(self.squeeze2(self.squeeze1(x)))))
        return self.shortcut(x) + y


def sqnxt_kernels(c_in: int, c_out: int, stride: int, h: int, w: int, kernel: int) -> list[KernelSpec]:
    half, quarter = _widths(c_in)
    ho, wo = conv_out_size(h, stride), conv_out_size(w, stride)
    ks = [conv("pw", c_in, half, h, w, 1, stride),
          conv("pw", half, quarter, ho, wo),
          conv("conv", quarter, half, ho, wo, (kernel, 1)),
          conv("conv", half, half, ho, wo, (1, kernel)),
          conv("pw", half, c_out, ho, wo, act=False)]
    if not (stride == 1 and c_in == c_out):
        ks.append(conv("pw", c_in, c_out, h, w, 1, stride, act=False))
    ks.append(KernelSpec("add", c_out, c_out, ho, wo, quantized=False))
    return ks


def lower_squeezenext(b: ProgramBuilder, blk: SqueezeNextBlock, name: str, src: str, bits: LayerBits) -> str:
    t = src
    for sub in ("squeeze1", "squeeze2", "sep_v", "sep_h"):
        t = b.conv(f"{name}.{sub}", getattr(blk, sub), t, bits.w, bits.a)
    y = b.conv(f"{name}.expand", blk.expand, t, bits.w, None)
    sc = src if isinstance(blk.shortcut, nn.Identity) else b.conv(f"{name}.shortcut", blk.shortcut, src, bits.w, None)
    return b.merge("add", f"{name}.add", (sc, y), bits.out)


for _k in (3, 5):
    register_op(OpDef(
        name=f"sqnxt_k{_k}", family="squeezenext",
        build=lambda ci, co, s, bs, k=_k: SqueezeNextBlock(ci, co, s, k, bs),
        kernels=lambda ci, co, s, h, w, k=_k: sqnxt_kernels(ci, co, s, h, w, k),
        lower=lower_squeezenext,
        params={"kernel": _k},
    ))

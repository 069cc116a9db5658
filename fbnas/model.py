"""The child network built from an Arch: stem, searchable layers at their bits, head, pool, classifier."""
from __future__ import annotations



import torch
import torch.nn as nn

from .arch import Arch
from .blocks import build_op
from .quant.bits import BitState
from .quant.fake import ConvBNAct, QLinear


def make_stem(in_channels: int, channels: int, kernel: int, stride: int, bit_state: BitState) -> ConvBNAct:
    return ConvBNAct(in_channels, channels, kernel, stride=stride, bit_state=bit_state)


class Head(nn.Module):
    """1x1 conv+BN+ReLU to the head width, global average pool, linear classifier."""

    def __init__(self, c_in: int, channels: int, num_classes: int, bit_state: BitState, dropout: float = 0.0):
        super().__init__()
        self.conv = ConvBNAct(c_in, channels, 1, bit_state=bit_state)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = QLinear(channels, num_classes, bit_state=bit_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv(x)).flatten(1)
        return self.classifier(self.dropout(x))


class FbnasNet(nn.Module):
    """A derived architecture. `quantized=False` gives the float model of the same architecture."""

    def __init__(self, arch: Arch, quantized: bool = True, dropout: float = 0.0):
        super().__init__()
        self.arch = arch

        def bits(w: int, a: int) -> BitState:
            return BitState.fixed(w, a) if quantized else BitState.float()

        fixed = bits(arch.fixed_w_bits, arch.fixed_a_bits)
        self.stem = make_stem(arch.in_channels, arch.stem_channels, arch.stem_kernel, arch.stem_stride, fixed)
        self.layers = nn.ModuleList(build_op(l.op, l.c_in, l.channels, l.stride, bits(l.w_bits, l.a_bits))
                                    for l in arch.layers)
        c_last = arch.layers[-1].channels if arch.layers else arch.stem_channels
        self.head = Head(c_last, arch.head_channels, arch.num_classes, bits(arch.fixed_w_bits, arch.fixed_a_bits),
                         dropout)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def build_model(arch: Arch | str, quantized: bool = True, dropout: float = 0.0) -> FbnasNet:
    """Build the network of an Arch (or an arch.json path)."""
    if not isinstance(arch, Arch):
        from .arch import load_arch

        arch = load_arch(arch)
    return FbnasNet(arch, quantized=quantized, dropout=dropout)

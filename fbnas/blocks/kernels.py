"""Fused kernels as data: what one conv+BN+act (or add, shuffle, pool, linear) costs in MACs and bytes.

Every block describes itself as a list of KernelSpec; latency models, BOPs and model size are computed
from these, never from the nn.Module, so costs can be known without building the network.
"""
from __future__ import annotations

from dataclasses import dataclass


def conv_out_size(size: int, stride: int) -> int:
    """Output size of a 'same'-padded conv: ceil(size / stride)."""
    return -(-size // stride)

# kinds: conv (dense kxk), pw (1x1, groups allowed), dw (depthwise), add (residual), shuffle (channel
# shuffle copy), concat (copy), pool (global average), linear (classifier), act (an activation runtimes do not
# fuse into the conv before it, e.g. SiLU: one elementwise pass)
KERNEL_KINDS = ("conv", "pw", "dw", "add", "shuffle", "concat", "pool", "linear", "act")


@dataclass(frozen=True)
class KernelSpec:
    kind: str
    c_in: int
    c_out: int
    h_in: int
    w_in: int
    kh: int = 1
    kw: int = 1
    stride: int = 1
    groups: int = 1
    act: bool = False
    quantized: bool = True  # conv/linear weights and inputs follow the op's bits

    @property
    def h_out(self) -> int:
        return conv_out_size(self.h_in, self.stride) if self.kind not in ("pool", "linear") else 1

    @property
    def w_out(self) -> int:
        return conv_out_size(self.w_in, self.stride) if self.kind not in ("pool", "linear") else 1

    @property
    def has_weights(self) -> bool:
        return self.kind in ("conv", "pw", "dw", "linear")

    @property
    def params(self) -> int:
        """Weight count (BN folds into the conv; a linear layer has a bias)."""
        if not self.has_weights:
            return 0
        w = self.c_out * (self.c_in // self.groups) * self.kh * self.kw
        return w + (self.c_out if self.kind == "linear" else 0)

    @property
    def weight_count(self) -> int:
        if not self.has_weights:
            return 0
        return self.c_out * (self.c_in // self.groups) * self.kh * self.kw

    @property
    def macs(self) -> int:
        if self.kind in ("conv", "pw", "dw"):
            return self.h_out * self.w_out * self.c_out * (self.c_in // self.groups) * self.kh * self.kw
        if self.kind == "linear":
            return self.c_in * self.c_out
        return 0

    @property
    def in_elems(self) -> int:
        if self.kind == "add":
            return 2 * self.c_in * self.h_in * self.w_in
        if self.kind == "linear":
            return self.c_in
        return self.c_in * self.h_in * self.w_in

    @property
    def out_elems(self) -> int:
        return self.c_out * self.h_out * self.w_out

    def bytes(self, w_bits: int, a_bits: int, out_bits: int | None = None) -> float:
        """Bytes moved: input activations at a_bits, weights at w_bits, outputs at out_bits (default a_bits)."""
        ob = a_bits if out_bits is None else out_bits
        return (self.in_elems * a_bits + self.weight_count * w_bits + self.out_elems * ob) / 8.0

    def signature(self) -> str:
        return (f"{self.kind}:k{self.kh}x{self.kw}:g{self.groups}:s{self.stride}:"
                f"{self.c_in}x{self.h_in}x{self.w_in}->{self.c_out}")


def conv(kind: str, c_in: int, c_out: int, h: int, w: int, k: int | tuple[int, int] = 1, stride: int = 1,
         groups: int = 1, act: bool = True) -> KernelSpec:
    kh, kw = (k, k) if isinstance(k, int) else k
    return KernelSpec(kind, c_in, c_out, h, w, kh, kw, stride, groups, act)

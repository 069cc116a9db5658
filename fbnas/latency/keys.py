"""Canonical latency-table keys: one string per (op, input shape, channels, stride, bits).

A key holds everything that changes the cost of a part of the network and nothing about where it sits:
`ir_k3_e6|32x32|16->24|s1|w4a8` is the same entry whichever layer produces that shape. The op name
encodes type, kernel, expansion and groups (keys of the block registry). The fixed parts have their own
op names: `conv_k{k}` (a dense kxk conv+BN+ReLU: the stem, and the 1x1 head as `conv_k1`), `avgpool`
(global average pool) and `linear` (the classifier).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from ..arch import Arch
from ..blocks import KernelSpec, is_known_op, op_kernels
from ..blocks.kernels import conv
from ..errors import LatencyTableError
from ..space import SearchSpace

_KEY_RE = re.compile(r"^(?P<op>[a-z][a-z0-9_]*)\|(?P<h>\d+)x(?P<w>\d+)\|(?P<c_in>\d+)->(?P<c_out>\d+)"
                     r"\|s(?P<stride>\d+)\|w(?P<w_bits>\d+)a(?P<a_bits>\d+)$")
_FIXED_CONV_RE = re.compile(r"^conv_k(?P<k>\d+)$")
FIXED_OPS = ("conv_k<k>", "avgpool", "linear")


@dataclass(frozen=True)
class OpSignature:
    """Everything that changes the cost of one op instance."""

    op: str
    h: int
    w: int
    c_in: int
    c_out: int
    stride: int
    w_bits: int
    a_bits: int

    @property
    def key(self) -> str:
        return (f"{self.op}|{self.h}x{self.w}|{self.c_in}->{self.c_out}|s{self.stride}"
                f"|w{self.w_bits}a{self.a_bits}")

    @property
    def shape_key(self) -> str:
        """The key without bits: ops that differ only in bits run the same float kernels."""
        return f"{self.op}|{self.h}x{self.w}|{self.c_in}->{self.c_out}|s{self.stride}"

    def kernels(self) -> list[KernelSpec]:
        return signature_kernels(self)

    def with_bits(self, w_bits: int, a_bits: int) -> "OpSignature":
        return OpSignature(self.op, self.h, self.w, self.c_in, self.c_out, self.stride, w_bits, a_bits)


def op_key(op: str, h: int, w: int, c_in: int, c_out: int, stride: int, w_bits: int, a_bits: int) -> str:
    return OpSignature(op, h, w, c_in, c_out, stride, w_bits, a_bits).key


def parse_key(key: str) -> OpSignature:
    """Key string -> OpSignature; LatencyTableError if it is malformed or names an unknown op."""
    m = _KEY_RE.match(key) if isinstance(key, str) else None
    if m is None:
        raise LatencyTableError(
            f"malformed latency key {key!r}; expected 'op|HxW|Cin->Cout|sS|wWaA', e.g. 'ir_k3_e6|32x32|16->24|s1|w4a8'")
    sig = OpSignature(m["op"], *(int(m[f]) for f in ("h", "w", "c_in", "c_out", "stride", "w_bits", "a_bits")))
    if not (is_known_op(sig.op) or sig.op in ("avgpool", "linear") or _FIXED_CONV_RE.match(sig.op)):
        raise LatencyTableError(f"latency key {key!r} names unknown op {sig.op!r}")
    return sig


def signature_kernels(sig: OpSignature) -> list[KernelSpec]:
    """The fused kernels one signature runs (the cost description the device models price)."""
    fixed = _FIXED_CONV_RE.match(sig.op)
    if fixed:
        k = int(fixed["k"])
        return [conv("conv" if k > 1 else "pw", sig.c_in, sig.c_out, sig.h, sig.w, k, sig.stride)]
    if sig.op == "avgpool":
        return [KernelSpec("pool", sig.c_in, sig.c_out, sig.h, sig.w, quantized=False)]
    if sig.op == "linear":
        return [KernelSpec("linear", sig.c_in, sig.c_out, 1, 1)]
    return op_kernels(sig.op, sig.c_in, sig.c_out, sig.stride, sig.h, sig.w)


# ------------------------------------------------------------------------------------ fixed parts

def fixed_signatures(in_channels: int, input_size: int, stem_channels: int, stem_kernel: int, stem_stride: int,
                     last_channels: int, final_size: int, head_channels: int, num_classes: int, w_bits: int,
                     a_bits: int) -> list[tuple[str, OpSignature]]:
    """(part name, signature) for stem, head, pool and classifier."""
    s = input_size
    f = final_size
    return [
        ("stem", OpSignature(f"conv_k{stem_kernel}", s, s, in_channels, stem_channels, stem_stride, w_bits, a_bits)),
        ("head", OpSignature("conv_k1", f, f, last_channels, head_channels, 1, w_bits, a_bits)),
        ("pool", OpSignature("avgpool", f, f, head_channels, head_channels, 1, w_bits, a_bits)),
        ("classifier", OpSignature("linear", 1, 1, head_channels, num_classes, 1, w_bits, a_bits)),
    ]


def space_fixed_signatures(space: SearchSpace) -> list[tuple[str, OpSignature]]:
    return fixed_signatures(space.in_channels, space.input_size, space.stem_channels, space.stem_kernel,
                            space.stem_stride, space.last_stage_channels, space.final_size, space.head_channels,
                            space.num_classes, space.fixed_w_bits, space.fixed_a_bits)


def layer_signature(space: SearchSpace, layer_index: int, op: str, w_bits: int, a_bits: int) -> OpSignature:
    layer = space.layers()[layer_index]
    return OpSignature(op, layer.h_in, layer.w_in, layer.c_in, layer.c_out, layer.stride, w_bits, a_bits)


# ------------------------------------------------------------------------------------ enumeration

def space_signatures(space: SearchSpace) -> dict[str, OpSignature]:
    """Every signature the space can produce (all layers x candidates x bits, plus the fixed parts)."""
    out: dict[str, OpSignature] = {}
    for layer in space.layers():
        for op in space.candidates:
            for wb in space.w_bits:
                for ab in space.a_bits:
                    sig = OpSignature(op, layer.h_in, layer.w_in, layer.c_in, layer.c_out, layer.stride, wb, ab)
                    out[sig.key] = sig
    for _, sig in space_fixed_signatures(space):
        out[sig.key] = sig
    return out


def space_keys(space: SearchSpace) -> set[str]:
    return set(space_signatures(space))


def arch_signatures(arch: Arch) -> list[tuple[str, OpSignature]]:
    """(part name, signature) for every part of an architecture, in network order."""
    fixed = fixed_signatures(arch.in_channels, arch.input_size, arch.stem_channels, arch.stem_kernel,
                             arch.stem_stride, arch.layers[-1].channels if arch.layers else arch.stem_channels,
                             arch.final_size, arch.head_channels, arch.num_classes, arch.fixed_w_bits,
                             arch.fixed_a_bits)
    out = [fixed[0]]
    for i, (l, size) in enumerate(zip(arch.layers, arch.layer_sizes())):
        out.append((f"layers.{i}", OpSignature(l.op, size, size, l.c_in, l.channels, l.stride, l.w_bits, l.a_bits)))
    out += fixed[1:]
    return out


def arch_keys(arch: Arch) -> list[str]:
    """The key of every part of `arch`, in network order (a repeated shape appears once per use)."""
    return [sig.key for _, sig in arch_signatures(arch)]


def unique_shapes(signatures: Iterable[OpSignature]) -> dict[str, OpSignature]:
    """shape_key -> one representative signature (bits of the first seen)."""
    out: dict[str, OpSignature] = {}
    for sig in signatures:
        out.setdefault(sig.shape_key, sig)
    return out


__all__ = ["OpSignature", "op_key", "parse_key", "signature_kernels", "fixed_signatures", "space_fixed_signatures",
           "layer_signature", "space_signatures", "space_keys", "arch_signatures", "arch_keys", "unique_shapes"]

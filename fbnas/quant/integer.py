"""Integer-only model (HAWQ-V3 dyadic arithmetic), derived from a calibrated FoldedNet.

Everything between the input quantizer and the final dequantization of the logits is integer:
  weights   int8 tensors (per-output-channel symmetric at the layer's w_bits), bias int32 at S_w*S_in
  conv      int32 accumulator: im2col + torch._int_mm (int8 x int8 -> int32; an unsigned 8-bit input is shifted
            by -128 and corrected with 128*sum(w)), depthwise convs as int32 multiply-adds
  requant   y = round(acc * m / 2^c) in exact int64, m a 31-bit integer, c <= 62; ties half to even (default)
            or half away from zero; then clamp to the output range (ReLU is the lower clamp at 0)
  add       each branch requantized to the output scale with its own (m, c), integer sum, clamp
  concat    each branch requantized to the output scale, concatenated
  pool      int64 sum over H*W, then one dyadic requantization by S_in/(H*W*S_out) with the same rounding
  linear    int32 accumulator; the logits are acc * (S_w*S_in) in float64 -> float32 (the final dequantization)
Quantization parameters are buffers: the model moves with .to(device) and runs on CPU and CUDA.

Conversion refuses a layer whose accumulator could overflow int32 at its bits, naming the layer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arch import Arch
from ..errors import ConfigError
from .dyadic import INT32_MAX, check_rounding, dyadic, requantize, round_float
from .fold import FoldedConv, FoldedLinear, FoldedNet, InputQuant, QMerge, QPool, Step, node_key, run_program


# --------------------------------------------------------------------------------- integer kernels

def _pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] >= size:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, size - t.shape[dim]]
    return F.pad(t, pad)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def int_matmul(a: torch.Tensor, b: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Exact a @ b for integer a [M, K] with values in [offset-128, offset+127] and int8 b [K, N] -> int32.

    Runs on torch._int_mm (int8 x int8 -> int32 on CPU and CUDA); shapes are zero-padded to its constraints
    (M > 16, K and N multiples of 8; on CUDA M too)."""
    m, k = a.shape
    n = b.shape[1]
    a8 = (a.to(torch.int32) - offset).to(torch.int8) if offset else a.to(torch.int8)
    b8 = b.to(torch.int8)
    # 17 zero rows always (M > 16 without a shape-dependent branch, so torch.export keeps the batch dynamic)
    rows = 17
    if a8.is_cuda:  # cuBLASLt int8 GEMM also needs M a multiple of 8 (export traces on CPU, keeping this branch out)
        rows += (-(m + 17)) % 8
    a8 = F.pad(_pad_to(a8, 1, max(_round_up(k, 8), 16)), (0, 0, 0, rows)).contiguous()
    b8 = _pad_to(_pad_to(b8, 0, a8.shape[1]), 1, max(_round_up(n, 8), 16)).contiguous()
    if b8.is_cuda:  # cuBLASLt's int8 GEMM runs the "TN" layout: the second operand column-major
        b8 = b8.t().contiguous().t()
    out = torch._int_mm(a8, b8)[:m, :n]
    if offset:
        out = out + offset * b.to(torch.int32).sum(dim=0, dtype=torch.int32)
    return out


def conv_pads(padding: Sequence[int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a conv's padding given as (h, w) or as (top, left, bottom, right)."""
    return (padding[0], padding[1], padding[0], padding[1]) if len(padding) == 2 else tuple(padding)


def space_to_depth(x: torch.Tensor, block: int) -> torch.Tensor:
    """ONNX SpaceToDepth: [N, C, H, W] -> [N, C*b*b, H/b, W/b], channel (row phase * b + column phase) * C + c."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(n, c * block * block, h // block, w // block)


def int_conv2d(x: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int], groups: int,
               offset: int = 0) -> torch.Tensor:
    """Exact integer conv2d: x [N, C, H, W] integer activations, w [Co, C/g, kh, kw] int8 -> int32 [N, Co, Ho, Wo].
    padding: (h, w), or (top, left, bottom, right)."""
    n, c, h, wd = x.shape
    co, cig, kh, kw = w.shape
    sh, sw = stride
    pt, pl, pb, pr = conv_pads(padding)
    ho, wo = (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1
    xp = F.pad(x.to(torch.int32), (pl, pr, pt, pb))
    taps = [xp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] for i in range(kh) for j in range(kw)]
    if cig == 1 and groups == c == co:  # depthwise: int32 multiply-adds per tap
        wt = w.to(torch.int32).reshape(co, kh * kw)
        acc = torch.zeros((n, co, ho, wo), dtype=torch.int32, device=x.device)
        for t, tap in enumerate(taps):
            acc += tap * wt[:, t].view(1, co, 1, 1)
        return acc
    patches = torch.stack(taps, dim=2)  # [N, C, K, Ho, Wo]
    cog = co // groups
    outs = []
    for g in range(groups):
        a = patches[:, g * cig:(g + 1) * cig].permute(0, 3, 4, 1, 2).reshape(n * ho * wo, cig * kh * kw)
        b = w[g * cog:(g + 1) * cog].reshape(cog, cig * kh * kw).t()
        outs.append(int_matmul(a, b, offset))
    acc = torch.cat(outs, dim=1) if groups > 1 else outs[0]
    return acc.reshape(n, ho, wo, co).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------- integer nodes

class IntInput(nn.Module):
    """The input quantizer: float image -> int32 at the input scale (the float -> integer boundary)."""

    def __init__(self, scale: torch.Tensor, lo: int, hi: int, rounding: str):
        super().__init__()
        self.register_buffer("scale", scale.detach().double().reshape(()))
        self.lo, self.hi, self.rounding = lo, hi, rounding
        self.space_to_depth = 1  # codes rearranged by ONNX SpaceToDepth for the first conv (quant.align)
        self.pad_channels = 0  # zero channels appended for int8 kernels (quant.align)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(round_float(x.double() / self.scale, self.rounding), self.lo, self.hi).to(torch.int32)
        if self.space_to_depth > 1:
            q = space_to_depth(q, self.space_to_depth)
        return F.pad(q, (0, 0, 0, 0, 0, self.pad_channels)) if self.pad_channels else q


class IntConv(nn.Module):
    """Integer conv: int8 weight, int32 bias, int32 accumulator; requantized and clamped unless raw."""

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor, stride, padding, groups: int,
                 offset: int, mult: Optional[tuple[torch.Tensor, torch.Tensor]], lo: int, hi: int,
                 rounding: str):
        super().__init__()
        self.name = name
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("bias", bias.to(torch.int32))
        self.stride, self.padding, self.groups, self.offset = tuple(stride), tuple(padding), groups, offset
        self.raw = mult is None
        if mult is not None:
            self.register_buffer("m", mult[0].to(torch.int64))
            self.register_buffer("c", mult[1].to(torch.int64))
        self.lo, self.hi, self.rounding = lo, hi, rounding

    def accumulate(self, q: torch.Tensor) -> torch.Tensor:
        acc = int_conv2d(q, self.weight, self.stride, self.padding, self.groups, self.offset)
        return acc + self.bias.view(1, -1, 1, 1)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        acc = self.accumulate(q)
        if self.raw:
            return acc
        y = requantize(acc, self.m.view(1, -1, 1, 1), self.c.view(1, -1, 1, 1), self.rounding)
        return torch.clamp(y, self.lo, self.hi).to(torch.int32)


class IntLinear(IntConv):
    """Integer classifier; returns float32 logits acc * (S_w*S_in): the final dequantization."""

    def __init__(self, name: str, weight, bias, offset: int, deq_scale: torch.Tensor):
        super().__init__(name, weight, bias, (1, 1), (0, 0), 1, offset, None, 0, 0, "half_even")
        self.register_buffer("deq_scale", deq_scale.detach().double())

    def accumulate(self, q):
        return int_matmul(q, self.weight.t(), self.offset) + self.bias

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return (self.accumulate(q).double() * self.deq_scale).float()


class IntMerge(nn.Module):
    """Integer add / concat: each input requantized with its own (m, c), [ReLU], combined, clamped."""

    def __init__(self, name: str, kind: str, mults: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 relus: Sequence[bool], lo: int, hi: int, rounding: str):
        super().__init__()
        self.name, self.kind, self.relus = name, kind, tuple(relus)
        for i, (m, c) in enumerate(mults):
            self.register_buffer(f"m{i}", m.to(torch.int64))
            self.register_buffer(f"c{i}", c.to(torch.int64))
        self.lo, self.hi, self.rounding = lo, hi, rounding

    def forward(self, qs: list[torch.Tensor]) -> torch.Tensor:
        parts = []
        for i, (q, relu) in enumerate(zip(qs, self.relus)):
            m, c = getattr(self, f"m{i}"), getattr(self, f"c{i}")
            if m.dim() == 1:
                m, c = m.view(1, -1, 1, 1), c.view(1, -1, 1, 1)
            y = requantize(q, m, c, self.rounding)
            parts.append(torch.clamp_min(y, 0) if relu else y)
        out = torch.cat(parts, dim=1) if self.kind == "concat" else sum(parts[1:], parts[0])
        return torch.clamp(out, self.lo, self.hi).to(torch.int32)


class IntPool(nn.Module):
    """Global average pool: int64 sum over H*W, then requantization by m/2^c ~ S_in/(H*W*S_out)."""

    def __init__(self, name: str, m: torch.Tensor, c: torch.Tensor, lo: int, hi: int, rounding: str):
        super().__init__()
        self.name = name
        self.register_buffer("m", m.to(torch.int64))
        self.register_buffer("c", c.to(torch.int64))
        self.lo, self.hi, self.rounding = lo, hi, rounding

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        total = q.to(torch.int64).sum(dim=(2, 3))
        return torch.clamp(requantize(total, self.m, self.c, self.rounding), self.lo, self.hi).to(torch.int32)


# ----------------------------------------------------------------------------------- conversion

def _check_accumulator(name: str, q_w: torch.Tensor, q_b: torch.Tensor, in_levels: tuple[int, int],
                       w_bits: int, a_bits: int) -> None:
    """Refuse a layer whose worst-case |acc| = sum|W_c| * max|x| + |b_c| can reach 2^31."""
    x_max = max(abs(in_levels[0]), abs(in_levels[1]))
    bound = q_w.abs().reshape(q_w.shape[0], -1).sum(dim=1).double() * x_max + q_b.abs().double()
    worst = float(bound.max())
    if worst > INT32_MAX:
        ch = int(bound.argmax())
        raise ConfigError(f"{name}: the int32 accumulator can overflow at w{w_bits}/a{a_bits} (worst case "
                          f"{worst:.3g} > 2^31-1 at output channel {ch}); use fewer bits or a smaller bias/fan-in")


class IntegerNet(nn.Module):
    """The integer-only network. Same program as the FoldedNet it came from; integer tensors throughout."""

    def __init__(self, arch: Arch, steps: Sequence[Step], nodes: dict[str, nn.Module], blocks: dict[str, str],
                 scales: dict[str, torch.Tensor], rounding: str,
                 levels: Optional[dict[str, tuple[int, int]]] = None,
                 acc_scales: Optional[dict[str, torch.Tensor]] = None):
        super().__init__()
        self.arch = arch
        self.steps = list(steps)
        self.nodes = nn.ModuleDict(nodes)
        self.blocks = dict(blocks)
        # descriptive metadata for dump/compare and ONNX export (never used by the integer forward):
        self.scales = {k: v.double() for k, v in scales.items()}  # tensor name -> scale
        self.levels = dict(levels or {})  # tensor name -> integer range (lo, hi)
        self.acc_scales = {k: v.double() for k, v in (acc_scales or {}).items()}  # conv/linear -> S_w*S_in
        self.rounding = rounding

    def forward(self, x: torch.Tensor, record: Optional[dict] = None) -> torch.Tensor:
        return run_program(self.steps, self.nodes, x, record)

    @property
    def input_node(self) -> IntInput:
        return self.nodes["input"]


@torch.no_grad()
def to_integer(folded: FoldedNet) -> IntegerNet:
    """Snapshot a calibrated FoldedNet into an IntegerNet (exact: the same float64 parameter computations as
    the FoldedNet's exact forward)."""
    rounding = check_rounding(folded.rounding)
    env: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}  # tensor -> (scale, integer levels)
    nodes: dict[str, nn.Module] = {}
    acc_scales: dict[str, torch.Tensor] = {}
    for st in folded.steps:
        key = node_key(st.name)
        node = folded.nodes[key] if key in folded.nodes else None
        if st.kind == "input":
            node.out.check_calibrated(st.name)
            lo, hi = node.out.levels()
            nodes[key] = IntInput(node.out.scale(), lo, hi, rounding)
            env[st.output] = (node.out.scale(), (lo, hi))
        elif st.kind in ("conv", "linear"):
            s_in, in_lv = env[st.inputs[0]]
            q_w, q_b, s_acc = node.integer_weights(s_in, torch.float64)
            acc_scales[st.name] = s_acc
            a_bits = _bits_of(in_lv)
            _check_accumulator(st.name, q_w, q_b, in_lv, node.w_bits, a_bits)
            offset = 128 if in_lv[1] > 127 else 0
            if isinstance(node, FoldedLinear):
                nodes[key] = IntLinear(st.name, q_w, q_b, offset, s_acc)
                continue
            if node.raw:
                nodes[key] = IntConv(st.name, q_w, q_b, node.stride, node.padding, node.groups, offset, None, 0, 0,
                                     rounding)
                acc_hi = float(q_w.abs().reshape(q_w.shape[0], -1).sum(1).max()) * max(map(abs, in_lv))
                env[st.output] = (s_acc, (-int(acc_hi), int(acc_hi)))
                continue
            node.out.check_calibrated(st.name)
            s_out = node.out.scale()
            lo, hi = node.out.levels()
            lo = max(lo, 0) if node.relu else lo
            nodes[key] = IntConv(st.name, q_w, q_b, node.stride, node.padding, node.groups, offset,
                                 dyadic(s_acc / s_out, st.name), lo, hi, rounding)
            env[st.output] = (s_out, (lo, hi))
        elif st.kind in ("add", "concat"):
            node.out.check_calibrated(st.name)
            s_out = node.out.scale()
            mults = [dyadic(env[i][0] / s_out, f"{st.name} input {j}") for j, i in enumerate(st.inputs)]
            lo, hi = node.out.levels()
            nodes[key] = IntMerge(st.name, st.kind, mults, node.relus, lo, hi, rounding)
            env[st.output] = (s_out, (lo, hi))
        elif st.kind == "pool":
            node.out.check_calibrated(st.name)
            s_in, _ = env[st.inputs[0]]
            s_out = node.out.scale()
            hw = folded.arch.final_size ** 2
            m, c = dyadic(s_in / hw / s_out, st.name)
            lo, hi = node.out.levels()
            nodes[key] = IntPool(st.name, m, c, lo, hi, rounding)
            env[st.output] = (s_out, (lo, hi))
        else:  # split / shuffle: same scale and levels
            env[st.output] = env[st.inputs[0]]
    scales = {k: v[0] for k, v in env.items()}
    levels = {k: (int(v[1][0]), int(v[1][1])) for k, v in env.items()}
    return IntegerNet(folded.arch, folded.steps, nodes, folded.blocks, scales, rounding, levels, acc_scales)


def _bits_of(levels: tuple[int, int]) -> int:
    lo, hi = levels
    return int(hi).bit_length() + (1 if lo < 0 else 0)

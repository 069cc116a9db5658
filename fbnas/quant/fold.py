"""BN folding and the folded fake-quant model: the network of the last QAT phase, quantized exactly where the
integer-only model quantizes.

A trained `FbnasNet` (ConvBNAct kernels, float BN and residuals) is lowered into a `FoldedNet`: a flat
program of steps over named tensors, with BN folded into each conv (running statistics) and one output
quantizer per produced tensor (not per consumer), so that every tensor has exactly one scale:

    input   float image -> signed integer at the fixed activation bits
    conv    integer conv + int32 bias (scale S_w*S_in) -> [ReLU] -> requantized to its own output scale,
            or kept as a raw accumulator when an add/concat consumes it
    add     both branches requantized to the output scale (own dyadic multipliers), integer add, clamp
    concat  every branch requantized to the output scale, then concatenated
    split / shuffle   channel slicing / permutation: scale unchanged
    pool    integer sum over H*W, then one dyadic requantization (S_in / (H*W*S_out))
    linear  integer classifier; the logits are dequantized (acc * S_w*S_in), the only float op after the input

The folded model computes "in the integer domain": each tensor travels as integer-valued floats q with its
scale S (value = q*S); weights, bias and every rescaling use straight-through rounding, and rescaling uses
the same dyadic multiplier m/2^c as the integer model. The gradients are those of ordinary fake quantization
(the scales are constants), and in `exact` mode (float64, the default in eval) the forward equals the integer
model's bit for bit. A tensor's bit-width is that of the op that consumes it (the a_bits of the next
non-identity layer; fixed bits for the head), as in the unfolded model where a conv quantizes its input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arch import Arch
from ..blocks import get_op
from ..errors import ConfigError
from .dyadic import INT32_MAX, check_rounding, dyadic, dyadic_value, round_float
from .act import ActQuantizer
from .bits import act_levels, qmax_signed
from .fake import ConvBNAct, QLinear, weight_scale


# ------------------------------------------------------------------------------------------ program

@dataclass(frozen=True)
class Step:
    """One node of the program: `kind` applied to the tensors named `inputs`, writing tensor `output`."""

    kind: str  # input | conv | add | concat | split | shuffle | pool | linear
    name: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict = field(default_factory=dict, hash=False, compare=False)


def node_key(name: str) -> str:
    return name.replace(".", "/")


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torch.nn.ChannelShuffle's permutation, for any dtype."""
    n, c = x.shape[:2]
    return x.reshape(n, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def _on_tensor(slot: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply fn to a slot's integer tensor: fake slots are (q, scale) pairs, integer slots bare tensors."""
    if isinstance(slot, tuple):
        return (fn(slot[0]),) + slot[1:]
    return fn(slot)


def run_program(steps: Sequence[Step], nodes: nn.ModuleDict, x: torch.Tensor,
                record: Optional[dict] = None) -> torch.Tensor:
    """Interpret the program on input x. Shared by the folded fake-quant model and the integer model, whose
    nodes take and return their own slot type. `record`, if given, receives every tensor by name."""
    env: dict[str, Any] = {}
    out = None
    for st in steps:
        node = nodes[node_key(st.name)] if node_key(st.name) in nodes else None
        if st.kind == "input":
            val = node(x)
        elif st.kind in ("conv", "pool"):
            val = node(env[st.inputs[0]])
        elif st.kind in ("add", "concat"):
            val = node([env[i] for i in st.inputs])
        elif st.kind == "split":
            a, b = st.attrs["channels"]
            val = _on_tensor(env[st.inputs[0]], lambda t: t[:, a:b])
        elif st.kind == "shuffle":
            val = _on_tensor(env[st.inputs[0]], lambda t: channel_shuffle(t, st.attrs["groups"]))
        elif st.kind == "linear":
            val = node(env[st.inputs[0]])
            out = val
        else:
            raise ValueError(f"unknown step kind {st.kind!r}")
        env[st.output] = val
        if record is not None:
            record[st.output] = val
    return out


# ----------------------------------------------------------------------------------- fake-quant nodes

class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, mode: str):
        return round_float(z, mode)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def round_ste(z: torch.Tensor, mode: str) -> torch.Tensor:
    return _RoundSTE.apply(z, mode)


class QuantPoint(nn.Module):
    """The output quantizer of one tensor: EMA min/max range (ActQuantizer), bits, signed iff min < 0."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)
        self.observer = ActQuantizer()

    def observe(self, real: torch.Tensor) -> None:
        if self.training and not self.observer.frozen:
            self.observer.observe(real)

    def check_calibrated(self, where: str) -> None:
        if not bool(self.observer.initialized):
            raise ConfigError(f"{where}: activation range never observed; calibrate (a training-mode forward) "
                              "before evaluating or converting")

    def scale(self) -> torch.Tensor:
        return self.observer.scale(self.bits).double()

    def levels(self) -> tuple[int, int]:
        return act_levels(self.bits, bool(self.observer.running_min < 0))


def _requant_fake(q: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor, mode: str, where: str,
                  channel_dim: int = 1) -> torch.Tensor:
    """round(q * m/2^c) with m/2^c the dyadic form of s_in/s_out (per channel when s_in is a vector)."""
    mult = dyadic_value(*dyadic(s_in / s_out, where), dtype=q.dtype)
    if mult.dim() == 1:
        mult = mult.view((1, -1) + (1,) * (q.dim() - 2))
    return round_ste(q * mult, mode)


def _per_channel(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.view((1, -1) + (1,) * (like.dim() - 2)) if s.dim() == 1 else s


class InputQuant(nn.Module):
    def __init__(self, bits: int, name: str = "input"):
        super().__init__()
        self.name = name
        self.out = QuantPoint(bits)
        self.rounding = "half_even"
        self.exact = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.out.observe(x)
        self.out.check_calibrated(self.name)
        s = self.out.scale()
        lo, hi = self.out.levels()
        dtype = torch.float64 if self.exact else torch.float32
        q = torch.clamp(round_float(x.to(dtype) / s.to(dtype), self.rounding), lo, hi)
        return q, s


class FoldedConv(nn.Module):
    """Conv with BN folded in (weight W*g/sigma, bias beta - mean*g/sigma), per-channel symmetric integer
    weights at w_bits, int32 bias at S_w*S_in, optional ReLU, and an output quantizer unless `out` is None
    (then the raw accumulator goes to an add/concat, which applies the ReLU after rescaling)."""

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor, stride, padding, groups: int,
                 w_bits: int, relu: bool, out_bits: Optional[int]):
        super().__init__()
        self.name = name
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.stride, self.padding, self.groups = tuple(stride), tuple(padding), int(groups)
        self.w_bits, self.relu = int(w_bits), bool(relu)
        self.out = QuantPoint(out_bits) if out_bits is not None else None
        self.rounding = "half_even"
        self.exact = False

    @classmethod
    def from_convbnact(cls, name: str, cba: ConvBNAct, w_bits: int, out_bits: Optional[int]) -> "FoldedConv":
        conv, bn = cba.conv, cba.bn
        inv_std = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        weight = conv.weight.detach() * inv_std.view(-1, 1, 1, 1)
        bias = bn.bias.detach() - bn.running_mean * inv_std
        if conv.bias is not None:
            bias = bias + conv.bias.detach() * inv_std
        return cls(name, weight, bias, conv.stride, conv.padding, conv.groups, w_bits,
                   isinstance(cba.act, nn.ReLU), out_bits)

    @property
    def raw(self) -> bool:
        return self.out is None

    def integer_weights(self, s_in: torch.Tensor, dtype: torch.dtype):
        """(q_w, q_b, s_acc): integer-valued weight and bias in `dtype` (straight-through), and the per-channel
        accumulator scale S_w*S_in in float64."""
        s_w = weight_scale(self.weight, self.w_bits).reshape(-1).double()
        s_acc = s_w * s_in.double()
        w = self.weight.to(dtype) / s_w.to(dtype).view((-1,) + (1,) * (self.weight.dim() - 1))
        if self.w_bits == 1:
            q_w = w + (torch.where(w >= 0, 1.0, -1.0).to(dtype) - w).detach()
        else:
            qm = qmax_signed(self.w_bits)
            q_w = torch.clamp(round_ste(w, self.rounding), -qm, qm)
        q_b = torch.clamp(round_ste(self.bias.to(dtype) / s_acc.to(dtype), self.rounding), -INT32_MAX, INT32_MAX)
        return q_w, q_b, s_acc

    def accumulate(self, q: torch.Tensor, q_w: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(q, q_w, q_b, self.stride, self.padding, 1, self.groups)

    def forward(self, slot: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        q_in, s_in = slot
        dtype = torch.float64 if self.exact else torch.float32
        q_w, q_b, s_acc = self.integer_weights(s_in, dtype)
        acc = self.accumulate(q_in.to(dtype), q_w, q_b)
        if self.raw:
            return acc, s_acc
        real = acc * _per_channel(s_acc, acc).to(dtype)
        self.out.observe(torch.relu(real) if self.relu else real)
        self.out.check_calibrated(self.name)
        s_out = self.out.scale()
        lo, hi = self.out.levels()
        z = _requant_fake(acc, s_acc, s_out, self.rounding, self.name)
        return torch.clamp(z, max(lo, 0) if self.relu else lo, hi), s_out


class FoldedLinear(FoldedConv):
    """The classifier: integer weights and int32 bias like a conv; returns dequantized float logits."""

    @classmethod
    def from_linear(cls, name: str, lin: QLinear, w_bits: int) -> "FoldedLinear":
        bias = lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features)
        return cls(name, lin.weight.detach(), bias, (1,), (0,), 1, w_bits, False, None)

    def accumulate(self, q, q_w, q_b):
        return F.linear(q, q_w, q_b)

    def forward(self, slot):
        acc, s_acc = super().forward(slot)
        return (acc * s_acc.to(acc.dtype)).float()


class QMerge(nn.Module):
    """Integer add or channel concat: every input requantized to the output scale ([ReLU] per input)."""

    def __init__(self, name: str, kind: str, relus: Sequence[bool], out_bits: int):
        super().__init__()
        self.name, self.kind, self.relus = name, kind, tuple(bool(r) for r in relus)
        self.out = QuantPoint(out_bits)
        self.rounding = "half_even"
        self.exact = False

    def combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=1) if self.kind == "concat" else sum(parts[1:], parts[0])

    def forward(self, slots: list[tuple[torch.Tensor, torch.Tensor]]):
        dtype = torch.float64 if self.exact else torch.float32
        reals = []
        for (q, s), relu in zip(slots, self.relus):
            r = q.to(dtype) * _per_channel(s, q).to(dtype)
            reals.append(torch.relu(r) if relu else r)
        self.out.observe(self.combine(reals))
        self.out.check_calibrated(self.name)
        s_out = self.out.scale()
        lo, hi = self.out.levels()
        parts = []
        for i, ((q, s), relu) in enumerate(zip(slots, self.relus)):
            z = _requant_fake(q.to(dtype), s, s_out, self.rounding, f"{self.name} input {i}")
            parts.append(torch.relu(z) if relu else z)
        return torch.clamp(self.combine(parts), lo, hi), s_out


class QPool(nn.Module):
    """Global average pool: integer sum over H*W, then requantization by S_in / (H*W*S_out)."""

    def __init__(self, name: str, out_bits: int):
        super().__init__()
        self.name = name
        self.out = QuantPoint(out_bits)
        self.rounding = "half_even"
        self.exact = False

    def forward(self, slot):
        q, s_in = slot
        dtype = torch.float64 if self.exact else torch.float32
        hw = q.shape[2] * q.shape[3]
        total = q.to(dtype).sum(dim=(2, 3))
        self.out.observe(total * (s_in / hw).to(dtype))
        self.out.check_calibrated(self.name)
        s_out = self.out.scale()
        lo, hi = self.out.levels()
        z = _requant_fake(total, s_in / hw, s_out, self.rounding, self.name)
        return torch.clamp(z, lo, hi), s_out


# ----------------------------------------------------------------------------------------- lowering

@dataclass
class LayerBits:
    w: int  # weight bits of the op
    a: int  # bits of the tensors inside the op (the op's a_bits)
    out: int  # bits of the op's output tensor (its consumer's a_bits)


class ProgramBuilder:
    """Collects steps and folded nodes while a network is lowered (each op's `OpDef.lower`, in its block file,
    calls conv/merge/split/shuffle)."""

    def __init__(self):
        self.steps: list[Step] = []
        self.nodes: dict[str, nn.Module] = {}
        self.relu_pending: dict[str, bool] = {}
        self._n = 0

    def _emit(self, kind: str, name: str, inputs: Sequence[str], node: Optional[nn.Module] = None,
              **attrs) -> str:
        out = name if node is not None else f"{name}#{self._n}"
        self._n += 1
        self.steps.append(Step(kind, name, tuple(inputs), out, attrs))
        if node is not None:
            self.nodes[node_key(name)] = node
        return out

    def input(self, bits: int) -> str:
        return self._emit("input", "input", (), InputQuant(bits))

    def conv(self, name: str, cba: ConvBNAct, src: str, w_bits: int, out_bits: Optional[int]) -> str:
        node = FoldedConv.from_convbnact(name, cba, w_bits, out_bits)
        out = self._emit("conv", name, (src,), node)
        self.relu_pending[out] = node.raw and node.relu
        return out

    def merge(self, kind: str, name: str, srcs: Sequence[str], out_bits: int) -> str:
        relus = [self.relu_pending.get(s, False) for s in srcs]
        return self._emit(kind, name, srcs, QMerge(name, kind, relus, out_bits))

    def split(self, name: str, src: str, start: int, end: int) -> str:
        return self._emit("split", name, (src,), channels=(start, end))

    def shuffle(self, name: str, src: str, groups: int) -> str:
        return self._emit("shuffle", name, (src,), groups=groups)

    def pool(self, name: str, src: str, bits: int) -> str:
        return self._emit("pool", name, (src,), QPool(name, bits))

    def linear(self, name: str, lin: QLinear, src: str, w_bits: int) -> str:
        return self._emit("linear", name, (src,), FoldedLinear.from_linear(name, lin, w_bits))


def _consumer_bits(arch: Arch, layers: nn.ModuleList, start: int) -> int:
    """a_bits of the first non-identity layer from `start` on (the head's fixed bits past the end)."""
    for i in range(start, len(arch.layers)):
        if not isinstance(layers[i], nn.Identity):
            return arch.layers[i].a_bits
    return arch.fixed_a_bits


class FoldedNet(nn.Module):
    """The folded fake-quant network (see the module docstring). `exact` (default: on in eval mode) computes
    in float64 so that the forward equals the integer-only model's; training runs in float32."""

    def __init__(self, arch: Arch, steps: Sequence[Step], nodes: dict[str, nn.Module], blocks: dict[str, str],
                 rounding: str = "half_even"):
        super().__init__()
        self.arch = arch
        self.steps = list(steps)
        self.nodes = nn.ModuleDict(nodes)
        self.blocks = dict(blocks)  # block name (stem, layers.i, head.conv, head.pool) -> tensor name
        self.exact: Optional[bool] = None
        self.set_rounding(rounding)

    def set_rounding(self, mode: str) -> None:
        self.rounding = check_rounding(mode)
        for m in self.nodes.values():
            m.rounding = mode

    def freeze_ranges(self, frozen: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, ActQuantizer):
                m.frozen = frozen

    def forward(self, x: torch.Tensor, record: Optional[dict] = None) -> torch.Tensor:
        exact = (not self.training) if self.exact is None else self.exact
        for m in self.nodes.values():
            m.exact = exact
        return run_program(self.steps, self.nodes, x, record)

    @torch.no_grad()
    def calibrate(self, batches) -> None:
        """Initialise the output ranges from a few batches (EMA), in training mode without a weight update."""
        was = self.training
        self.train()
        for x in batches:
            self(x)
        self.train(was)


def fold_model(net: nn.Module, rounding: str = "half_even") -> FoldedNet:
    """Lower a trained FbnasNet (BN running statistics) into its FoldedNet. Ranges start uncalibrated."""
    arch: Arch = net.arch
    b = ProgramBuilder()
    t = b.input(arch.fixed_a_bits)
    blocks: dict[str, str] = {}
    t = b.conv("stem", net.stem, t, arch.fixed_w_bits, _consumer_bits(arch, net.layers, 0))
    blocks["stem"] = t
    for i, (layer, choice) in enumerate(zip(net.layers, arch.layers)):
        bits = LayerBits(choice.w_bits, choice.a_bits, _consumer_bits(arch, net.layers, i + 1))
        t = get_op(choice.op).lower(b, layer, f"layers.{i}", t, bits)
        blocks[f"layers.{i}"] = t
    fw, fa = arch.fixed_w_bits, arch.fixed_a_bits
    t = b.conv("head.conv", net.head.conv, t, fw, fa)
    blocks["head.conv"] = t
    t = b.pool("head.pool", t, fa)
    blocks["head.pool"] = t
    b.linear("head.classifier", net.head.classifier, t, fw)
    return FoldedNet(arch, b.steps, b.nodes, blocks, rounding)

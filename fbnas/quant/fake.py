"""Fake quantization with straight-through gradients, and bit-mixing (EdMIPS-style) convolutions.

Weights: per-output-channel symmetric, S_c = max|W_c| / (2^(b-1) - 1), W_q = clamp(round(W/S_c)) * S_c.
Activations: static ranges from an EMA of the batch max (max |x| when signed); unsigned [0, 2^b - 1] while the
observed minimum is >= 0 (after ReLU), symmetric signed otherwise. A quantizer with known bits (`clip_bits`, a trained
child) can instead track an EMA of each batch's MSE-optimal clipping range at those bits (`mse_clip_range`):
at 4 bits and below the min/max range wastes most levels on a few outliers.

Bit choices: a `BitState` is shared by every conv of one candidate op. It holds the bit options and, during
a search, either their mixing weights (soft) or the sampled option (hard). Soft: the conv mixes the quantized
weight, W_mix = sum_b p_b Q_b(W), and the quantized input, x_mix = sum_b p_b Q_b(x), then runs one
convolution, whatever the number of bit options. Hard: only the sampled option is computed; the supernet
puts the straight-through factor of the sampled bits on the op's output (on the weights, a BatchNorm in
training mode would cancel it and no gradient would reach the bit logits).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

EMA_MOMENTUM = 0.1
_EPS = 1e-8


# --------------------------------------------------------------------------------------- bit state

@dataclass(eq=False)
class BitState:
    """Bit options of one op and, during search, their current mixing weights.

    w_probs / a_probs: None means 'use the first (only) option'; a tensor [n] mixes the options.
    w_index / a_index: in hard mode, the sampled option, the only one computed (they take precedence over
    the probs, which then hold the straight-through one-hot for inspection).
    enabled=False turns quantization off (float model).
    """

    w_choices: tuple[int, ...]
    a_choices: tuple[int, ...]
    w_probs: Optional[torch.Tensor] = None
    a_probs: Optional[torch.Tensor] = None
    w_index: Optional[int] = None
    a_index: Optional[int] = None
    enabled: bool = True

    @classmethod
    def fixed(cls, w_bits: int, a_bits: int) -> "BitState":
        return cls((int(w_bits),), (int(a_bits),))

    @classmethod
    def float(cls) -> "BitState":
        return cls((32,), (32,), enabled=False)

    def clear(self) -> None:
        self.w_probs = self.a_probs = None
        self.w_index = self.a_index = None

    def single_w_bits(self) -> Optional[int]:
        """The one weight bit-width in use (the sampled option, or the only one), or None while options mix."""
        if self.w_index is not None:
            return self.w_choices[self.w_index]
        return self.w_choices[0] if self.w_probs is None else None

    def single_a_bits(self) -> Optional[int]:
        """The one activation bit-width in use (the sampled option, or the only one), or None while options mix."""
        if self.a_index is not None:
            return self.a_choices[self.a_index]
        return self.a_choices[0] if self.a_probs is None else None


# ------------------------------------------------------------------------------- weight quantization

def qmax_signed(bits: int) -> int:
    return max(2 ** (bits - 1) - 1, 1)


def weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scale, shape [C_out, 1, 1, ...]."""
    flat = w.detach().reshape(w.shape[0], -1)
    if bits == 1:
        s = flat.abs().mean(dim=1)
    else:
        s = torch.linalg.vector_norm(flat, ord=float("inf"), dim=1) / qmax_signed(bits)
    return s.clamp_min(_EPS).reshape((-1,) + (1,) * (w.dim() - 1))


def quantize_weight_int(w: torch.Tensor, bits: int, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Integer weight values (as float tensor): clamp(round(W/S)) in [-(2^(b-1)-1), 2^(b-1)-1]; sign for 1 bit."""
    s = weight_scale(w, bits) if scale is None else scale
    if bits == 1:
        return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))
    q = qmax_signed(bits)
    return torch.clamp(torch.round(w / s), -q, q)


class _STEWeight(torch.autograd.Function):
    """Q_b(W) = clamp(round(W / S_c), -q, q) * S_c forward (sign(W) * mean|W_c| for 1 bit), identity backward:
    with S_c from each channel's max |W| every weight lies inside the range, so the clipped straight-through
    gradient is the identity. No host round-trip, unlike ATen's fused fake_quantize_per_channel_affine, which
    reads min/max of its zero points back to the host on every call (two device syncs per conv)."""

    @staticmethod
    def forward(ctx, w, bits: int):
        s = weight_scale(w, bits)
        return quantize_weight_int(w, bits, s) * s

    @staticmethod
    def backward(ctx, grad):
        return grad, None


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(shape: int | tuple[int, ...], value: float, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A cached tensor filled with `value` (made once per shape, value, device and dtype; never written)."""
    key = (shape, value, device, dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.full(shape if isinstance(shape, tuple) else (shape,), value, device=device,
                                     dtype=dtype)
    return _CONSTANTS[key]


def _constant_vector(values: tuple[float, ...], device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """A cached 1-d tensor of `values` (made once per values, device and dtype, with no host wait; never written)."""
    key = ("vector", values, device, dtype)
    if key not in _CONSTANTS:
        host = torch.tensor(values, dtype=dtype)
        _CONSTANTS[key] = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    return _CONSTANTS[key]


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Q_b(W) per output channel, symmetric; straight-through gradient (every weight lies inside the range)."""
    if bits >= 32:
        return w
    return _STEWeight.apply(w, bits)


def quant_error_sq(w: torch.Tensor, bits: int) -> torch.Tensor:
    """||Q_b(W) - W||^2 with Q_b(W) held constant, so the gradient is 2(W - Q_b(W)) (not zero as under STE)."""
    with torch.no_grad():
        s = weight_scale(w, bits)
        wq = quantize_weight_int(w, bits, s) * s
    return (w - wq).pow(2).sum()


def mixed_weight(w: torch.Tensor, state: BitState) -> torch.Tensor:
    if not state.enabled:
        return w
    bits = state.single_w_bits()
    if bits is not None:
        return fake_quant_weight(w, bits)
    return sum(p * fake_quant_weight(w, b) for p, b in zip(state.w_probs, state.w_choices))


_ALIGN = 64  # elements: every weight in a batch starts 128-byte aligned, as cuDNN's fast kernels need


class _BatchedSTEWeights(torch.autograd.Function):
    """Q_b(W) of many convs at once, each at its own bits (all >= 2): the weights are concatenated (each padded
    with zeros to a multiple of _ALIGN elements, so that every result starts aligned) and every output
    channel's scale, rounding and rescaling run as a handful of kernels over the whole batch, instead of ~7
    kernels per conv (a supernet step is bound by kernel launches on a GPU). Identity gradient to each weight,
    as _STEWeight; the result is bitwise equal to fake_quant_weight per conv. With `out_dtype` (the autocast
    dtype) the results are cast once, here, not by autocast at every conv."""

    @staticmethod
    def forward(ctx, row_of_elem, qmax_rows, n_rows: int, pads: list[int], out_dtype, *weights):
        parts = []
        for w, pad in zip(weights, pads):
            parts.append(w.reshape(-1))
            if pad:
                parts.append(_constant(pad, 0.0, w.device, w.dtype))
        flat = torch.cat(parts)
        rowmax = torch.zeros(n_rows, device=flat.device, dtype=flat.dtype)
        rowmax.scatter_reduce_(0, row_of_elem, flat.abs(), "amax")
        scale = (rowmax / qmax_rows).clamp_min(_EPS).index_select(0, row_of_elem)
        q = torch.round(flat / scale).mul_(scale)
        ctx.in_dtype = flat.dtype
        ctx.numels = [w.numel() for w in weights]
        if out_dtype is not None and out_dtype != flat.dtype:
            q = q.to(out_dtype)
        chunks = q.split([n + pad for n, pad in zip(ctx.numels, pads)])
        return tuple(t[:w.numel()].view_as(w) for t, w in zip(chunks, weights))

    @staticmethod
    def backward(ctx, *grads):
        if all(g.dtype == ctx.in_dtype for g in grads):
            return (None, None, None, None, None, *grads)
        flat = torch.cat([g.reshape(-1) for g in grads]).to(ctx.in_dtype)
        return (None, None, None, None, None, *(g.view_as(h) for g, h in zip(flat.split(ctx.numels), grads)))


def _row_lengths(rows: int, per_row: int, pad: int, device: torch.device) -> torch.Tensor:
    """Elements per output channel of a padded weight: the padding counts to the last channel (zeros: no
    effect on its max |W|)."""
    key = ("rows", rows, per_row, pad, device)
    if key not in _CONSTANTS:
        t = torch.full((rows,), per_row, dtype=torch.long)
        t[-1] += pad
        _CONSTANTS[key] = t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
    return _CONSTANTS[key]


def prequantize_weights(convs: Sequence["QConv2d"]) -> None:
    """Quantize the weights of `convs` (each at the bits of its BitState: the sampled or only option) in one
    batch and hand each conv its result for its next forward. Convs at 1 bit, with mixed (soft) bits or with
    quantization off keep quantizing their own weights."""
    batch, bits = [], []
    for c in convs:
        b = c.bit_state.single_w_bits()
        if c.bit_state.enabled and b is not None and 2 <= b < 32:
            batch.append(c)
            bits.append(b)
    if not batch:
        return
    w0 = batch[0].weight
    dev = w0.device
    rows = [c.weight.shape[0] for c in batch]
    numels = [c.weight.numel() for c in batch]
    pads = [-n % _ALIGN for n in numels]
    lengths = torch.cat([_row_lengths(r, n // r, pad, dev) for r, n, pad in zip(rows, numels, pads)])
    qmax = torch.cat([_constant(r, float(qmax_signed(b)), dev, w0.dtype) for r, b in zip(rows, bits)])
    n_rows, n_elem = sum(rows), sum(numels) + sum(pads)
    row_of_elem = torch.repeat_interleave(torch.arange(n_rows, device=dev), lengths, output_size=n_elem)
    out_dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
    for c, wq in zip(batch, _BatchedSTEWeights.apply(row_of_elem, qmax, n_rows, pads, out_dtype,
                                                     *(c.weight for c in batch))):
        c.prequantized = wq


# --------------------------------------------------------------------------- activation quantization

def act_levels(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range [lo, hi] of an activation at `bits`."""
    if signed:
        q = qmax_signed(bits)
        return -q, q
    return 0, 2 ** bits - 1


MSE_CLIP_GRID = 40          # candidate clipping ranges: span * k / grid, k = 1..grid
MSE_CLIP_SAMPLES = 1 << 16  # elements of the batch (an even stride through it) that score the candidates


@torch.no_grad()
def mse_clip_range(x: torch.Tensor, span: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """The clipping range c in (0, span] that minimises the mean squared error of quantizing x at `bits` with
    scale c / hi (hi = the top level), over a grid of candidates; a device scalar (no host read)."""
    flat = x.reshape(-1)
    xs = flat[:: max(1, flat.numel() // MSE_CLIP_SAMPLES)].float()
    lo, hi = act_levels(bits, signed)
    ratios = torch.arange(1, MSE_CLIP_GRID + 1, device=x.device, dtype=torch.float32) / MSE_CLIP_GRID
    clips = (span.float() * ratios).clamp_min(_EPS)
    scales = (clips / hi).unsqueeze(1)
    err = (torch.clamp(torch.round(xs / scales), lo, hi) * scales - xs).pow(2).mean(1)
    return clips[err.argmin()]


_DEFERRED: Optional[dict[int, tuple["ActQuantizer", torch.Tensor]]] = None


@contextmanager
def deferred_range_updates(enabled: bool = True):
    """Within the block, initialised ActQuantizers without MSE clipping quantize with their range as of the
    block's start and queue what they observe; at its end every queued range moves in a few multi-tensor
    kernels (instead of ~4 kernels per quantizer: a supernet step on a GPU is bound by kernel launches). The
    EMA is the same, one forward later."""
    global _DEFERRED
    if not enabled or _DEFERRED is not None:
        yield
        return
    _DEFERRED = {}
    try:
        yield
        pending = list(_DEFERRED.values())
    finally:
        _DEFERRED = None
    _update_ranges(pending)


@torch.no_grad()
def _update_ranges(pending: list[tuple["ActQuantizer", torch.Tensor]]) -> None:
    by_momentum: dict[float, list[tuple[ActQuantizer, torch.Tensor]]] = {}
    for q, x in pending:
        by_momentum.setdefault(q.momentum, []).append((q, x))
    for momentum, items in by_momentum.items():
        quantizers = [q for q, _ in items]
        spans = torch._foreach_norm([x for _, x in items], math.inf, dtype=torch.float32)  # max |x| per tensor
        torch._foreach_lerp_([q.running_max for q in quantizers], spans, momentum)
        signed = [q for q in quantizers if q.signed]
        if signed:
            torch._foreach_copy_([q.running_min for q in signed], torch._foreach_neg([q.running_max for q in signed]))
        for q in quantizers:
            q.prescale = None


def prescale_activations(convs: Sequence[nn.Module]) -> None:
    """Compute, in one batch, the input scale of each conv/linear in `convs` at its one activation bit-width
    (sampled or fixed) and hand it to the conv's quantizer for its next forward (cleared when its range
    moves). Quantizers with mixed (soft) bits, MSE clipping or no range yet compute their own."""
    batch, tops = [], []
    for c in convs:
        st, q = c.bit_state, c.act_quant
        bits = st.single_a_bits()
        if not st.enabled or bits is None or q.clip_bits is not None or not q._host_state()[0]:
            continue
        batch.append((q, bits))
        tops.append(float(q.top_level(bits)))
    if not batch:
        return
    maxes = torch.stack([q.running_max for q, _ in batch])
    top = torch.tensor(tops, dtype=maxes.dtype, pin_memory=maxes.is_cuda).to(maxes.device, non_blocking=True)
    scales = (maxes / top).clamp_min_(_EPS)
    for i, (q, bits) in enumerate(batch):
        q.prescale = (bits, scales[i])


class _MixedAct(torch.autograd.Function):
    """sum_b p_b Q_b(x), saving only x and p; the per-option Q_b(x) are recomputed in backward.
    scales, los, his: [n_options] tensors."""

    @staticmethod
    def forward(ctx, x, probs, scales, los, his):
        out = torch.zeros_like(x)
        for i in range(len(probs)):
            out += probs[i] * torch.clamp(torch.round(x / scales[i]), los[i], his[i]) * scales[i]
        ctx.save_for_backward(x, probs, scales, los, his)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, probs, scales, los, his = ctx.saved_tensors
        gx = torch.zeros_like(x)
        gp = torch.zeros_like(probs)
        for i in range(len(probs)):
            xs = x / scales[i]
            q = torch.clamp(torch.round(xs), los[i], his[i]) * scales[i]
            gp[i] = (grad * q).sum()
            gx += probs[i] * ((xs >= los[i]) & (xs <= his[i]))
        return grad * gx, gp, None, None, None


class ActQuantizer(nn.Module):
    """Activation fake-quantizer with an EMA range: [0, running_max] (unsigned) or [-running_max, running_max]
    (signed; running_min = -running_max).

    Signed (symmetric) or unsigned is decided once, at the first observation: a tensor after a ReLU is never
    negative, a linear output always is. After that the forward path never reads a value back to the host
    (no GPU sync): EMA updates are in-place lerps, and quantization is one fused kernel with a clipped
    straight-through gradient (ATen's fake_quantize_per_tensor_affine)."""

    def __init__(self, momentum: float = EMA_MOMENTUM):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed_flag", torch.zeros((), dtype=torch.bool))
        self.frozen = False
        self.clip_bits: Optional[int] = None  # set: track the MSE-optimal range at these bits, not min/max
        self._state: Optional[tuple[bool, bool]] = None  # host copy of (initialized, signed)
        self.prescale: Optional[tuple[int, torch.Tensor]] = None  # (bits, scale) from prescale_activations

    def _host_state(self) -> tuple[bool, bool]:
        if self._state is None:
            self._state = (bool(self.initialized), bool(self.signed_flag))
        return self._state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key, lo_key, hi_key = prefix + "signed_flag", prefix + "running_min", prefix + "running_max"
        if key not in state_dict and lo_key in state_dict:  # files from before the flag
            state_dict[key] = state_dict[lo_key] < 0
        if lo_key in state_dict and hi_key in state_dict and bool(state_dict.get(key, False)):
            # files from before signed ranges were kept symmetric: the same scale, max(|min|, |max|)
            span = torch.maximum(state_dict[lo_key].abs(), state_dict[hi_key].abs())
            state_dict[lo_key], state_dict[hi_key] = -span, span
        self._state = None
        self.prescale = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def signed(self) -> bool:
        return self._host_state()[1]

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Move the EMA range towards x's: max(x) (unsigned) or max|x| (signed, kept as [-span, span]), or the
        MSE-optimal clip at clip_bits. Inside deferred_range_updates the move waits for the block's end."""
        x = x.detach()
        initialized = self._host_state()[0]
        if initialized and self.clip_bits is None and _DEFERRED is not None:
            _DEFERRED[id(self)] = (self, x)
            return
        self.prescale = None  # the range moves: a precomputed scale is stale
        lo, hi = torch.aminmax(x)
        if not initialized:
            signed = bool(lo < 0)  # the one host read, at the first observation
            self.signed_flag.fill_(signed)
            self._state = (False, signed)
        if self.signed:
            span = torch.maximum(lo.abs(), hi.abs())
            hi = span if self.clip_bits is None else mse_clip_range(x, span, self.clip_bits, True)
            lo = -hi
        elif self.clip_bits is not None:
            hi = mse_clip_range(x, hi, self.clip_bits, False)
        if initialized:  # one multi-tensor kernel for both ends
            torch._foreach_lerp_((self.running_min, self.running_max), (lo.float(), hi.float()), self.momentum)
            return
        self.running_min.copy_(lo)
        self.running_max.copy_(hi)
        self.initialized.fill_(True)
        self._state = (True, self._state[1])

    def levels(self, bits: int) -> tuple[int, int]:
        return act_levels(bits, self.signed)

    def top_level(self, bits: int) -> int:
        return qmax_signed(bits) if self.signed else 2 ** bits - 1

    def scale(self, bits: int) -> torch.Tensor:
        if self.prescale is not None and self.prescale[0] == bits:
            return self.prescale[1]
        return (self.running_max / self.top_level(bits)).clamp_min(_EPS)

    def quantize(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        lo, hi = self.levels(bits)
        return torch.fake_quantize_per_tensor_affine(x, self.scale(bits), _constant((), 0, x.device, torch.int32),
                                                     lo, hi)

    def forward(self, x: torch.Tensor, state: BitState) -> torch.Tensor:
        if not state.enabled:
            return x
        if self.training and not self.frozen:
            self.observe(x)
        bits = state.single_a_bits()
        if bits is not None:
            return self.quantize(x, bits)
        levels = [self.levels(b) for b in state.a_choices]
        scales = torch.stack([self.scale(b) for b in state.a_choices]).to(x.dtype)
        los = _constant_vector(tuple(lv[0] for lv in levels), x.device, x.dtype)
        his = _constant_vector(tuple(lv[1] for lv in levels), x.device, x.dtype)
        return _MixedAct.apply(x, state.a_probs.to(x.dtype), scales, los, his)


# ------------------------------------------------------------------------------------ quantized layers

class QConv2d(nn.Conv2d):
    """Conv2d that fake-quantizes its input and its weight at the bits of a shared BitState."""

    def __init__(self, *args, bit_state: Optional[BitState] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bit_state = bit_state if bit_state is not None else BitState.float()
        self.act_quant = ActQuantizer()
        self.prequantized: Optional[torch.Tensor] = None  # set by prequantize_weights, used by the next forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.bit_state
        if not st.enabled:
            return super().forward(x)
        w, self.prequantized = self.prequantized, None
        if w is None:
            w = mixed_weight(self.weight, st)
        return self._conv_forward(self.act_quant(x, st), w, self.bias)


class QLinear(nn.Linear):
    """Linear layer with the same input/weight fake quantization as QConv2d."""

    def __init__(self, *args, bit_state: Optional[BitState] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bit_state = bit_state if bit_state is not None else BitState.float()
        self.act_quant = ActQuantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.bit_state
        if not st.enabled:
            return super().forward(x)
        return F.linear(self.act_quant(x, st), mixed_weight(self.weight, st), self.bias)


class ConvBNAct(nn.Module):
    """A fused kernel: QConv2d (no bias) + BatchNorm + optional ReLU. The unit of BN folding and of latency."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int] = 1, stride: int = 1,
                 groups: int = 1, act: bool = True, bit_state: Optional[BitState] = None):
        super().__init__()
        k = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        pad = (k[0] // 2, k[1] // 2)
        self.conv = QConv2d(c_in, c_out, k, stride=stride, padding=pad, groups=groups, bias=False,
                            bit_state=bit_state)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def bit_states(module: nn.Module) -> list[BitState]:
    """The distinct BitStates of the quantized convs and linears under `module` (one op shares one)."""
    return list({id(m.bit_state): m.bit_state for m in module.modules()
                 if isinstance(m, (QConv2d, QLinear))}.values())


def set_bit_state(modules: Sequence[nn.Module] | nn.Module, state: BitState) -> None:
    """Point every QConv2d/QLinear under `modules` at one shared BitState."""
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    for root in mods:
        for m in root.modules():
            if isinstance(m, (QConv2d, QLinear)):
                m.bit_state = state

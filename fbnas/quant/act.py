"""Activation fake quantization: EMA ranges, batched scales and range updates, MSE-optimal clipping, and the
EdMIPS mixture of bit options.

Static ranges from an EMA of the batch max (max |x| when signed); unsigned [0, 2^b - 1] while the observed minimum
is >= 0 (after ReLU), symmetric signed otherwise. A quantizer with known bits (`clip_bits`, a trained child) can
instead track an EMA of each batch's MSE-optimal clipping range at those bits (`mse_clip_range`): at 4 bits and
below the min/max range wastes most levels on a few outliers.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .bits import (EPS, BitState, act_levels, cached, constant, constant_matrix, constant_vector, qmax_signed,
                   to_device_async)

EMA_MOMENTUM = 0.1
log = logging.getLogger("fbnas")


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
    clips = (span.float() * ratios).clamp_min(EPS)
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


def _max_abs(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """max |x| of each tensor as float32 scalars: one multi-tensor kernel on a GPU; on a CPU from aminmax, the same
    values ~20x faster than the infinity-norm kernel there (which a CPU search step spent ~8% of its time in)."""
    if xs[0].device.type != "cpu":
        return torch._foreach_norm(xs, math.inf, dtype=torch.float32)
    return [torch.maximum(hi, -lo).float() for lo, hi in map(torch.aminmax, xs)]


@torch.no_grad()
def _update_ranges(pending: list[tuple["ActQuantizer", torch.Tensor]]) -> None:
    by_momentum: dict[float, list[tuple[ActQuantizer, torch.Tensor]]] = {}
    for q, x in pending:
        by_momentum.setdefault(q.momentum, []).append((q, x))
    for momentum, items in by_momentum.items():
        quantizers = [q for q, _ in items]
        spans = _max_abs([x for _, x in items])
        torch._foreach_lerp_([q.running_max for q in quantizers], spans, momentum)
        signed = [q for q in quantizers if q.signed]
        if signed:
            torch._foreach_copy_([q.running_min for q in signed], torch._foreach_neg([q.running_max for q in signed]))
        for q in quantizers:
            q.prescale = None


def _scale_from_range(conv: nn.Module) -> bool:
    """Whether a conv's input quantizer is on and its scale is its EMA range over a top level (a range observed,
    no MSE clipping): what the batched scale computations below can compute for it."""
    q = conv.act_quant
    return conv.bit_state.enabled and q.clip_bits is None and q._host_state()[0]


def prescale_activations(convs: Sequence[nn.Module], cached_tops: bool = False) -> None:
    """Compute, in one batch, the input scale of each conv/linear in `convs` at its one activation bit-width
    (sampled or fixed) and hand it to the conv's quantizer for its next forward (cleared when its range
    moves). Quantizers with mixed (soft) bits, MSE clipping or no range yet compute their own. `cached_tops`:
    the top levels come from a cached device constant instead of a fresh host copy (for bits that do not change
    from forward to forward, e.g. inside a CUDA graph, which must not copy from host memory)."""
    batch, tops = [], []
    for c in convs:
        q, bits = c.act_quant, c.bit_state.single_a_bits()
        if bits is None or not _scale_from_range(c):
            continue
        batch.append((q, bits))
        tops.append(float(q.top_level(bits)))
    if not batch:
        return
    maxes = torch.stack([q.running_max for q, _ in batch])
    if cached_tops:
        top = constant_vector(tuple(tops), maxes.device, maxes.dtype)
    else:
        top = torch.tensor(tops, dtype=maxes.dtype, pin_memory=maxes.is_cuda).to(maxes.device, non_blocking=True)
    scales = (maxes / top).clamp_min_(EPS)
    for i, (q, bits) in enumerate(batch):
        q.prescale = (bits, scales[i])


def prescale_activations_mixed(convs: Sequence[nn.Module]) -> None:
    """prescale_activations for convs whose activation bits mix (soft bits): the scales of every option of every
    conv in one batch, handed to each quantizer as (its bit options, [n_options] scales) for its next forward."""
    batch = [(c.act_quant, c.bit_state.a_choices) for c in convs
             if c.bit_state.single_a_bits() is None and _scale_from_range(c)]
    if not batch or len({len(ch) for _, ch in batch}) > 1:
        return  # none, or ragged options: each quantizer computes its own
    maxes = torch.stack([q.running_max for q, _ in batch])
    tops = constant_matrix(tuple(tuple(float(q.top_level(b)) for b in ch) for q, ch in batch), maxes.device,
                           maxes.dtype)
    scales = (maxes.unsqueeze(1) / tops).clamp_min_(EPS)
    for (q, ch), row in zip(batch, scales.unbind()):
        q.prescale = (ch, row)


def prescale_activations_sampled(convs: Sequence[nn.Module], bit_rows: Sequence[int], a_hot: torch.Tensor,
                                 a_bits: Sequence[int]) -> None:
    """The input scales and clipping bounds of `convs` at sampled bits held as device data: conv k is at the
    option of one-hot row `bit_rows[k]` of `a_hot` ([R, len(a_bits)]). Each quantizer gets (scale, lowest,
    highest value) as device scalars for its next forward, so the kernels are the same whatever was sampled
    (a CUDA graph can replay them). Every quantizer must have its range already (a forward observed it)."""
    quantizers = [c.act_quant for c in convs]
    if not quantizers:
        return
    if any(not q._host_state()[0] or q.clip_bits is not None for q in quantizers):
        raise RuntimeError("device-sampled activation bits need every quantizer's range (run one plain forward "
                           "first) and no MSE clipping")
    dev = a_hot.device
    signed = tuple(q.signed for q in quantizers)
    n_rows = a_hot.shape[0]
    tops_of_row = [(a_hot * constant_vector(tuple(float(act_levels(b, s)[1]) for b in a_bits), dev)).sum(-1)
                   for s in (False, True)]  # exact: a one-hot times integers
    index = cached(("act_bit_rows", tuple(bit_rows), signed, n_rows, dev), lambda: to_device_async(
        torch.tensor([r + n_rows * s for r, s in zip(bit_rows, signed)]), dev))
    tops = torch.cat(tops_of_row).index_select(0, index)
    scales = (torch.stack([q.running_max for q in quantizers]) / tops).clamp_min_(EPS)
    highest = tops * scales
    lowest = highest * constant_vector(tuple(-1.0 if s else 0.0 for s in signed), dev)
    for q, scale, lo, hi in zip(quantizers, scales.unbind(), lowest.unbind(), highest.unbind()):
        q.sampled = (scale, lo, hi)


_WIDE_LEVELS = 1 << 16  # beyond any activation's levels: the clamp to the sampled bits' range follows


class _FakeQuantBounded(torch.autograd.Function):
    """fake_quantize(x, scale, lo, hi) with the range given as device scalars lowest = lo * scale and highest =
    hi * scale instead of host integers: quantized on a wide integer range, then clamped; the gradient is
    masked to the elements inside the range (the clipped straight-through estimator, as fake_quantize's)."""

    @staticmethod
    def forward(ctx, x, scale, lowest, highest):
        y = fake_quantize(x, scale, -_WIDE_LEVELS, _WIDE_LEVELS)
        lo, hi = lowest.to(y.dtype), highest.to(y.dtype)
        ctx.save_for_backward((y >= lo) & (y <= hi))
        return y.clamp_(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quantize_bounded(x: torch.Tensor, scale: torch.Tensor, lowest: torch.Tensor, highest: torch.Tensor,
                          ) -> torch.Tensor:
    return _FakeQuantBounded.apply(x, scale, lowest, highest)


class _FakeQuantDecomposed(torch.autograd.Function):
    """fake_quantize_per_tensor_affine with zero point 0 as separate elementwise ops, the same arithmetic as
    ATen's kernel (round(x * (1/scale)) half to even, clamped, times scale; the gradient masked to the
    unclamped elements): on a CPU, ATen's fused kernel is several times slower than these ops in the forward."""

    @staticmethod
    def forward(ctx, x, scale, lo: int, hi: int):
        r = torch.round(x * torch.reciprocal(scale))
        q = r.clamp(lo, hi)
        ctx.save_for_backward(q == r)  # the elements inside the range
        return q.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0), None, None, None  # (grad * mask would first copy mask to float)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per-tensor fake quantization to the integer levels [lo, hi] at `scale` (zero point 0), with the clipped
    straight-through gradient."""
    if x.device.type == "cpu":
        return _FakeQuantDecomposed.apply(x, scale.to(x.dtype), lo, hi)
    return torch.fake_quantize_per_tensor_affine(x, scale, constant((), 0, x.device, torch.int32), lo, hi)


def _mix_forward(x: torch.Tensor, inv_scales: torch.Tensor, weights: torch.Tensor,
                 levels: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """sum_b weights[b] * clamp(round(x * inv_scales[b]), lo_b, hi_b), with weights[b] = p_b * scale_b."""
    out = None
    for i, (lo, hi) in enumerate(levels):
        r = torch.round(x * inv_scales[i]).clamp_(lo, hi)
        out = r * weights[i] if out is None else out.addcmul_(r, weights[i])
    return out


def _mix_backward(x: torch.Tensor, grad: torch.Tensor, inv_scales: torch.Tensor, probs: torch.Tensor,
                  scales: torch.Tensor, levels: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient to x: grad times the sum of p_b over the options whose rounded level is inside their range,
    the clipped straight-through estimator of each; gradient to p: sum(grad * Q_b(x)) per option)."""
    inside = None
    grad_probs = []
    for i, (lo, hi) in enumerate(levels):
        r = torch.round(x * inv_scales[i])
        q = r.clamp(lo, hi)
        grad_probs.append((grad * q).sum(dtype=torch.float32) * scales[i])
        term = torch.where(q == r, probs[i], 0.0)
        inside = term if inside is None else inside + term
    return (grad * inside).to(x.dtype), torch.stack(grad_probs)


_COMPILED_MIX: dict[str, tuple] = {}


def _mix_functions(x: torch.Tensor) -> tuple:
    """(forward, backward) of the activation mixture for x's device: on a GPU each compiled into one fused
    kernel (TorchInductor; the eager ones make ~4 passes over x per option forward and ~7 backward), else
    the eager ones. If compiling fails, the eager ones are used from then on, with a warning."""
    if x.device.type != "cuda" or _COMPILED_MIX.get("failed"):
        return _mix_forward, _mix_backward
    if "cuda" not in _COMPILED_MIX:
        _COMPILED_MIX["cuda"] = (torch.compile(_mix_forward, dynamic=True, fullgraph=True),
                                 torch.compile(_mix_backward, dynamic=True, fullgraph=True))
    return _COMPILED_MIX["cuda"]


def _call_mix(index: int, x: torch.Tensor, *args):
    """The activation mixture's forward (index 0) or backward (1), compiled where _mix_functions compiles it."""
    eager = (_mix_forward, _mix_backward)[index]
    fn = _mix_functions(x)[index]
    if fn is eager:
        return eager(x, *args)
    try:
        return fn(x, *args)
    except Exception as e:  # e.g. no Triton or no C compiler on this machine
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        log.warning("the fused activation mixture could not be compiled (%s: %s); mixing bit options eagerly",
                    type(e).__name__, (str(e).splitlines() or [""])[0][:200])
        _COMPILED_MIX["failed"] = True
        return eager(x, *args)


class _MixedAct(torch.autograd.Function):
    """sum_b p_b Q_b(x) (the EdMIPS mixture of activation bit options), saving only x; the per-option Q_b(x)
    are recomputed in backward. probs, scales: [n_options] tensors; levels: each option's (lo, hi)."""

    @staticmethod
    def forward(ctx, x, probs, scales, levels: tuple[tuple[int, int], ...]):
        inv = torch.reciprocal(scales)
        ctx.save_for_backward(x, probs, scales, inv)
        ctx.levels = levels
        return _call_mix(0, x, inv, probs * scales, levels)

    @staticmethod
    def backward(ctx, grad):
        x, probs, scales, inv = ctx.saved_tensors
        grad_x, grad_probs = _call_mix(1, x, grad, inv, probs, scales, ctx.levels)
        return grad_x, grad_probs.to(probs.dtype), None, None


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
        # (bits, scale) from prescale_activations, or (bit options, their scales) from prescale_activations_mixed
        self.prescale: Optional[tuple[int | tuple[int, ...], torch.Tensor]] = None
        self.sampled: Optional[tuple[torch.Tensor, ...]] = None  # prescale_activations_sampled's (scale, lo, hi)

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
        self.prescale = self.sampled = None
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
        return (self.running_max / self.top_level(bits)).clamp_min(EPS)

    def quantize(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        lo, hi = self.levels(bits)
        return fake_quantize(x, self.scale(bits), lo, hi)

    def forward(self, x: torch.Tensor, state: BitState) -> torch.Tensor:
        if not state.enabled:
            return x
        if self.training and not self.frozen:
            self.observe(x)
        if self.sampled is not None:
            return fake_quantize_bounded(x, *self.sampled)
        bits = state.single_a_bits()
        if bits is not None:
            return self.quantize(x, bits)
        choices = state.a_choices
        if self.prescale is not None and self.prescale[0] == choices:
            scales = self.prescale[1]
        else:
            scales = torch.stack([self.scale(b) for b in choices])
        return _MixedAct.apply(x, state.a_probs.float(), scales.float(), tuple(self.levels(b) for b in choices))

"""Weight fake quantization with straight-through gradients, and the quantized layers (QConv2d, QLinear,
ConvBNAct) that quantize their input (fbnas.quant.act) and weight at the bits of a shared BitState (fbnas.quant.bits).

Weights: per-output-channel symmetric, S_c = max|W_c| / (2^(b-1) - 1), W_q = clamp(round(W/S_c)) * S_c.
During a search: soft bits mix the quantized weight, W_mix = sum_b p_b Q_b(W), and the quantized input,
x_mix = sum_b p_b Q_b(x), then run one convolution, whatever the number of bit options. Hard bits compute only
the sampled option; the supernet puts the straight-through factor of the sampled bits on the op's output (on the
weights, a BatchNorm in training mode would cancel it and no gradient would reach the bit logits).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .act import ActQuantizer
from .bits import EPS, BitState, cached, constant, constant_vector, qmax_signed, to_device_async


# ------------------------------------------------------------------------------- weight quantization

def weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scale, shape [C_out, 1, 1, ...]."""
    flat = w.detach().reshape(w.shape[0], -1)
    if bits == 1:
        s = flat.abs().mean(dim=1)
    else:
        s = torch.linalg.vector_norm(flat, ord=float("inf"), dim=1) / qmax_signed(bits)
    return s.clamp_min(EPS).reshape((-1,) + (1,) * (w.dim() - 1))


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


def _flat_padded(weights: Sequence[torch.Tensor], pads: Sequence[int]) -> torch.Tensor:
    """The weights flattened into one tensor, each followed by `pad` zeros."""
    parts = []
    for w, pad in zip(weights, pads):
        parts.append(w.reshape(-1))
        if pad:
            parts.append(constant(pad, 0.0, w.device, w.dtype))
    return torch.cat(parts)


def _channel_max(flat: torch.Tensor, row_of_elem: torch.Tensor, n_rows: int) -> torch.Tensor:
    """max |W| of every output channel of a flat padded batch."""
    rowmax = torch.zeros(n_rows, device=flat.device, dtype=flat.dtype)
    return rowmax.scatter_reduce_(0, row_of_elem, flat.abs(), "amax")


def _unpad(flat: torch.Tensor, weights: Sequence[torch.Tensor], pads: Sequence[int]) -> tuple[torch.Tensor, ...]:
    chunks = flat.split([w.numel() + pad for w, pad in zip(weights, pads)])
    return tuple(t[:w.numel()].view_as(w) for t, w in zip(chunks, weights))


class _BatchedSTEWeights(torch.autograd.Function):
    """Q_b(W) of many convs at once, each at its own bits (all >= 2): the weights are concatenated (each padded
    with zeros to a multiple of _ALIGN elements, so that every result starts aligned) and every output
    channel's scale, rounding and rescaling run as a handful of kernels over the whole batch, instead of ~7
    kernels per conv (a supernet step is bound by kernel launches on a GPU). Identity gradient to each weight,
    as _STEWeight; the result is bitwise equal to fake_quant_weight per conv. With `out_dtype` (the autocast
    dtype) the results are cast once, here, not by autocast at every conv."""

    @staticmethod
    def forward(ctx, row_of_elem, qmax_rows, n_rows: int, pads: list[int], out_dtype, *weights):
        flat = _flat_padded(weights, pads)
        scale = (_channel_max(flat, row_of_elem, n_rows) / qmax_rows).clamp_min(EPS).index_select(0, row_of_elem)
        q = torch.round(flat / scale).mul_(scale)
        ctx.in_dtype = flat.dtype
        ctx.numels = [w.numel() for w in weights]
        if out_dtype is not None and out_dtype != flat.dtype:
            q = q.to(out_dtype)
        return _unpad(q, weights, pads)

    @staticmethod
    def backward(ctx, *grads):
        if all(g.dtype == ctx.in_dtype for g in grads):
            return (None, None, None, None, None, *grads)
        flat = torch.cat([g.reshape(-1) for g in grads]).to(ctx.in_dtype)
        return (None, None, None, None, None, *(g.view_as(h) for g, h in zip(flat.split(ctx.numels), grads)))


class _BatchedMixedWeights(torch.autograd.Function):
    """The EdMIPS mixture sum_b p_b Q_b(W) of many convs at once (soft bits): one flat padded batch as in
    _BatchedSTEWeights, every option's per-channel scale from one max |W| per channel, and the mixture in a
    few kernels over the batch, instead of ~25 kernels per conv. `probs` [n_convs, n_options]: each conv's
    mixing weights. Gradients: to each weight sum_b p_b times the incoming one (straight-through, as
    mixed_weight), to p_b of a conv the sum over its weights of the incoming gradient times Q_b(W) (summed
    per conv in float64, so the sum over a million weights keeps float32 precision)."""

    @staticmethod
    def forward(ctx, row_of_elem, qmax_options, n_rows: int, pads: list[int], seg_lengths, seg_ends, out_dtype,
                probs, *weights):
        flat = _flat_padded(weights, pads)
        n_elem = flat.numel()
        # options along the first dim: every kernel runs over the long second one
        scales = (_channel_max(flat, row_of_elem, n_rows).unsqueeze(0) / qmax_options.unsqueeze(1)).clamp_min(EPS)
        scale = scales.index_select(1, row_of_elem)  # [n_options, n_elem]
        q = torch.round(flat.unsqueeze(0) / scale).mul_(scale)
        p = probs.to(flat.dtype).t().repeat_interleave(seg_lengths, dim=1, output_size=n_elem)
        mixed = (q * p).sum(0)
        ctx.save_for_backward(q, p.sum(0), seg_ends)  # sum_b p_b: each weight's straight-through factor
        ctx.in_dtype = flat.dtype
        ctx.pads = pads
        if out_dtype is not None and out_dtype != flat.dtype:
            mixed = mixed.to(out_dtype)
        return _unpad(mixed, weights, pads)

    @staticmethod
    def backward(ctx, *grads):
        q, p_sum, seg_ends = ctx.saved_tensors
        g = _flat_padded(grads, ctx.pads).to(ctx.in_dtype)  # one cast for the batch
        per_conv = torch.cumsum((g * q).double(), 1).index_select(1, seg_ends)  # [n_options, n_convs]
        grad_probs = torch.diff(per_conv, dim=1, prepend=per_conv.new_zeros(per_conv.shape[0], 1)).t().float()
        grad_w = g * p_sum
        return (None, None, None, None, None, None, None, grad_probs, *_unpad(grad_w, grads, ctx.pads))


def _row_lengths(rows: int, per_row: int, pad: int, device: torch.device) -> torch.Tensor:
    """Elements per output channel of a padded weight: the padding counts to the last channel (zeros: no
    effect on its max |W|)."""
    def make() -> torch.Tensor:
        t = torch.full((rows,), per_row, dtype=torch.long)
        t[-1] += pad
        return to_device_async(t, device)

    return cached(("rows", rows, per_row, pad, device), make)


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
    qmax = torch.cat([constant(c.weight.shape[0], float(qmax_signed(b)), w0.device, w0.dtype)
                      for c, b in zip(batch, bits)])
    _quantize_batch(batch, qmax)


def prequantize_weights_sampled(convs: Sequence["QConv2d"], bit_rows: Sequence[int], w_hot: torch.Tensor,
                                w_bits: Sequence[int]) -> None:
    """prequantize_weights with the sampled bits as device data: conv k is at the option of one-hot row
    `bit_rows[k]` of `w_hot` ([R, len(w_bits)]), so the kernels are the same whatever was sampled (a CUDA
    graph can replay them). Every option must be >= 2 bits."""
    if not convs:
        return
    if min(w_bits) < 2:
        raise ValueError(f"device-sampled weight bits need options >= 2, got {tuple(w_bits)}")
    w0 = convs[0].weight
    dev = w0.device
    qmax_of_row = (w_hot.to(w0.dtype) * constant_vector(tuple(float(qmax_signed(b)) for b in w_bits), dev, w0.dtype)
                   ).sum(-1)  # exact: a one-hot times integers
    index = cached(("channel_bit_rows", tuple((r, c.weight.shape[0]) for r, c in zip(bit_rows, convs)), dev),
                   lambda: to_device_async(torch.tensor([r for r, c in zip(bit_rows, convs)
                                                         for _ in range(c.weight.shape[0])]), dev))
    _quantize_batch(list(convs), qmax_of_row.index_select(0, index))


def _batch_layout(batch: Sequence["QConv2d"]) -> tuple[torch.Tensor, int, list[int]]:
    """(output channel of every element of the flat padded batch, number of channels, padding of each conv)."""
    w0 = batch[0].weight
    dev = w0.device
    rows = [c.weight.shape[0] for c in batch]
    numels = [c.weight.numel() for c in batch]
    pads = [-n % _ALIGN for n in numels]
    lengths = torch.cat([_row_lengths(r, n // r, pad, dev) for r, n, pad in zip(rows, numels, pads)])
    n_rows, n_elem = sum(rows), sum(numels) + sum(pads)
    row_of_elem = torch.repeat_interleave(torch.arange(n_rows, device=dev), lengths, output_size=n_elem)
    return row_of_elem, n_rows, pads


def _autocast_dtype(dev: torch.device) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None


def _quantize_batch(batch: Sequence["QConv2d"], qmax: torch.Tensor) -> None:
    """Hand each conv of `batch` its weight quantized per output channel to the levels +-qmax (one entry per
    output channel of the batch, in order)."""
    row_of_elem, n_rows, pads = _batch_layout(batch)
    out_dtype = _autocast_dtype(batch[0].weight.device)
    for c, wq in zip(batch, _BatchedSTEWeights.apply(row_of_elem, qmax, n_rows, pads, out_dtype,
                                                     *(c.weight for c in batch))):
        c.prequantized = wq


def prequantize_weights_mixed(convs: Sequence["QConv2d"], bit_rows: Sequence[int], w_probs: torch.Tensor,
                              w_bits: Sequence[int]) -> None:
    """Soft (mixed) weight bits in one batch: conv k gets sum_b p_b Q_b(W_k) with p = row `bit_rows[k]` of
    `w_probs` ([R, len(w_bits)], the relaxation, device data) for its next forward; the same values and
    gradients as mixed_weight per conv, in a few kernels for all of them. Every option must be >= 2 bits."""
    if not convs:
        return
    if min(w_bits) < 2 or max(w_bits) >= 32:
        raise ValueError(f"batched mixed weight bits need options in [2, 32), got {tuple(w_bits)}")
    w0 = convs[0].weight
    dev = w0.device
    row_of_elem, n_rows, pads = _batch_layout(convs)
    padded = tuple(c.weight.numel() + pad for c, pad in zip(convs, pads))  # each conv's segment of the batch
    seg_lengths = cached(("conv_lengths", padded, dev), lambda: to_device_async(torch.tensor(padded), dev))
    seg_ends = cached(("conv_ends", padded, dev), lambda: to_device_async(torch.tensor(padded).cumsum(0) - 1, dev))
    index = cached(("conv_bit_rows", tuple(bit_rows), dev), lambda: to_device_async(torch.tensor(list(bit_rows)), dev))
    qmax = constant_vector(tuple(float(qmax_signed(b)) for b in w_bits), dev, w0.dtype)
    mixed = _BatchedMixedWeights.apply(row_of_elem, qmax, n_rows, pads, seg_lengths, seg_ends, _autocast_dtype(dev),
                                       w_probs.index_select(0, index), *(c.weight for c in convs))
    for c, wq in zip(convs, mixed):
        c.prequantized = wq


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

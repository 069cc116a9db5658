"""The supernet: one MixedLayer per searchable layer, a Gumbel-softmax over candidate ops and, per op,
distributions over weight and activation bits.

Modes:
- soft (FBNet): every candidate is computed and the outputs are summed with Gumbel-softmax weights.
- hard (GDAS-style straight-through): one op per layer is sampled and only it is computed; its output is
  scaled by a straight-through one-hot (value 1, gradient of the soft relaxation), so gradients reach every
  op logit. Bits are sampled the same way inside the chosen op, and their straight-through factors scale the
  op's output too (not its weights: BatchNorm in training mode is invariant to a weight scale, so a factor
  there would pass no gradient).
- two_path (ProxylessNAS-style): the two ops of the largest noisy logits are computed and mixed with the
  Gumbel-softmax restricted to them, so each step compares two ops (one op's straight-through factor mostly
  scales what the next layer's BatchNorm normalises away); bits are sampled as in hard mode. With
  anchor_steps K > 1 the first op of each layer (the anchor: the largest noisy logit when drawn) is kept for K
  forwards and only the second is drawn every forward (the largest noisy logit of the others): shared weights
  train as one consistent network plus a challenger instead of a fresh random pair per step, which leaves
  deep supernets at chance for hundreds of steps (bench/path_sampling.py). K = 1 is the plain Gumbel top-2.
- bit_sampling: how the bit options of an op are combined, independently of the op mode: `soft` (EdMIPS: the
  quantized weights and inputs of every option are mixed, one conv) or `hard` (one option sampled,
  straight-through). Hard-mode ops always sample their bits. Soft bits mix the weights of every conv in one
  batch and the activations in one fused kernel on a GPU (fbnas.quant).
- fixed: a given architecture (op and bit indices per layer) runs inside the supernet, no sampling.
- staged (soft ops only, for a CUDA graph): stage_sample() draws the sample on the host as usual and copies the noise
  and the sampled bits' one-hots into a device buffer; a forward with `staged` set reads them from there and keeps
  the sampled bits as device data (each conv's weight levels, each activation's scale and range), so its kernels
  are the same whatever was sampled (fbnas.cuda_graph).

One Gumbel sample per layer per forward (per batch, never per image). The discrete choices (which op runs,
which bits) are the argmax of the noisy logits as of the previous forward, so the host never waits for the
device; the relaxation that carries the gradients uses the current logits and the same noise. The weights
used in the forward are kept in `last_op_weights`, `last_w_weights`, `last_a_weights` (and the soft relaxations in `last_soft_*`)
so the latency and Hessian terms use exactly the same sample.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arch import Arch
from .blocks import build_op
from .model import Head, make_stem
from .quant.act import (deferred_range_updates, prescale_activations, prescale_activations_mixed,
                        prescale_activations_sampled)
from .quant.bits import BitState, to_device_async
from .quant.fake import (QConv2d, QLinear, prequantize_weights, prequantize_weights_mixed,
                         prequantize_weights_sampled)
from .space import LayerShape, SearchSpace
from .step_stats import copy_to_host_async

MODES = ("soft", "hard", "two_path")
PATHS = {"hard": 1, "two_path": 2}  # ops computed per layer and step (soft: all)
ANCHOR_STEPS = {"two_path": 1}  # a mode's default anchor_steps (others: 1)
BIT_MODES = ("soft", "hard")
_U_EPS = 1e-10


def resolved_anchor_steps(mode: str, anchor_steps: Optional[int]) -> int:
    """The anchor_steps a search runs with: the given value, or the mode's default when None."""
    return anchor_steps or ANCHOR_STEPS.get(mode, 1)


def gumbel_noise(shape: Sequence[int], generator: Optional[torch.Generator], device, dtype=torch.float32,
                 ) -> torch.Tensor:
    """Standard Gumbel noise, -log(-log U). U is drawn in float64 and clamped inside (0, 1), so the noise is
    always finite (|g| < 24): no inf or nan can reach the softmax."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_(_U_EPS, 1.0 - _U_EPS)
    return (-torch.log(-torch.log(u))).to(device=device, dtype=dtype)


def gumbel_softmax_rows(logits: torch.Tensor, noise: torch.Tensor, one_hot: Optional[torch.Tensor], tau: float,
                        restrict: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-softmax over the last dim of [R, n] logits with given noise: (weights used in the forward, soft
    relaxation). With `one_hot` (the sampled choices, [R, n]) the weights are straight-through one-hots: value
    one_hot, gradient of the soft relaxation; with `restrict`, `one_hot` marks several choices per row and both
    are the softmax over those alone (the others exactly 0)."""
    noisy = (logits + noise) / tau
    if restrict:
        soft = F.softmax(noisy.masked_fill(one_hot == 0, float("-inf")), dim=-1)
        return soft, soft
    soft = F.softmax(noisy, dim=-1)
    if one_hot is None:
        return soft, soft
    return one_hot - soft.detach() + soft, soft


def has_quantized_weights(module: nn.Module) -> bool:
    return any(isinstance(m, QConv2d) for m in module.modules())


LEGACY_LOGIT_NAMES = {"alpha": "op_logits", "beta_w": "w_bit_logits", "beta_a": "a_bit_logits"}


class MixedLayer(nn.Module):
    def __init__(self, shape: LayerShape, candidates: Sequence[str], w_bits: Sequence[int], a_bits: Sequence[int],
                 quantized: bool = True):
        super().__init__()
        self.shape = shape
        self.op_names = tuple(candidates)
        self.w_bits, self.a_bits = tuple(w_bits), tuple(a_bits)
        self.quantized = quantized
        self.bit_states = [BitState(self.w_bits, self.a_bits, enabled=quantized) for _ in candidates]
        self.ops = nn.ModuleList(build_op(op, shape.c_in, shape.c_out, shape.stride, bs)
                                 for op, bs in zip(candidates, self.bit_states))
        n_ops = len(candidates)
        self.op_logits = nn.Parameter(torch.zeros(n_ops))
        # bit logits only for ops that have quantized weights (an identity skip has no bits to choose)
        self.bit_ops = [i for i, op in enumerate(self.ops) if has_quantized_weights(op)] if quantized else []
        self.w_bit_logits = nn.Parameter(torch.zeros(len(self.bit_ops), len(self.w_bits)))
        self.a_bit_logits = nn.Parameter(torch.zeros(len(self.bit_ops), len(self.a_bits)))
        self.last_op_weights: Optional[torch.Tensor] = None
        self.last_w_weights: Optional[torch.Tensor] = None
        self.last_a_weights: Optional[torch.Tensor] = None
        self.last_soft_op: Optional[torch.Tensor] = None
        self.last_soft_w: Optional[torch.Tensor] = None
        self.last_soft_a: Optional[torch.Tensor] = None
        self.last_indices: list[int] = []  # the ops computed in hard, two_path and fixed forwards
        self.last_coef: Optional[torch.Tensor] = None  # [n_ops] output scale of each op: op weight x bit factors

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.op_logits, self.w_bit_logits, self.a_bit_logits]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # search checkpoints written with the names alpha / beta_w / beta_a load into the renamed logits
        for old, new in LEGACY_LOGIT_NAMES.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fix(self, op_index: int, w_index: int, a_index: int) -> None:
        """Run one given (op, bits) choice, no sampling (evaluation of a child inside the supernet)."""
        n_ops = len(self.ops)
        dev = self.op_logits.device
        self.last_op_weights = F.one_hot(torch.tensor(op_index, device=dev), n_ops).float()
        self.last_soft_op = self.last_coef = self.last_op_weights
        self.last_indices = [op_index]
        w1 = F.one_hot(torch.tensor(w_index, device=dev), len(self.w_bits)).float()
        a1 = F.one_hot(torch.tensor(a_index, device=dev), len(self.a_bits)).float()
        self.last_w_weights = self.last_soft_w = w1.expand(n_ops, -1)
        self.last_a_weights = self.last_soft_a = a1.expand(n_ops, -1)
        st = self.bit_states[op_index]
        st.clear()
        st.w_probs, st.a_probs, st.w_index, st.a_index = w1, a1, w_index, a_index

    def forward(self, x: torch.Tensor, hard: bool) -> torch.Tensor:
        """The sum of the computed ops' outputs, each times its coefficient (`hard`: last_indices' ops only)."""
        coef = self.last_coef  # a 0-dim float32 factor keeps a bfloat16 output bfloat16
        out = None
        for i in self.last_indices if hard else range(len(self.ops)):
            y = self.ops[i](x) * coef[i]
            out = y if out is None else out + y
        return out


class Supernet(nn.Module):
    """All candidate ops of a SearchSpace with Gumbel-softmax choices over ops and bits."""

    def __init__(self, space: SearchSpace, mode: str = "soft", quantized: bool = True, tau: float = 5.0,
                 bit_sampling: str = "soft", anchor_steps: int = 1):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if bit_sampling not in BIT_MODES:
            raise ValueError(f"bit_sampling must be one of {BIT_MODES}, got {bit_sampling!r}")
        self.space = space
        self.mode = mode
        self.paths = PATHS.get(mode)  # ops computed per layer and step; None: every op
        if anchor_steps < 1 or (anchor_steps > 1 and (self.paths or 0) < 2):
            raise ValueError(f"anchor_steps must be >= 1, and 1 unless several ops run per step (mode "
                             f"two_path); got {anchor_steps} with mode {mode!r}")
        self.anchor_steps = anchor_steps
        self._anchors: Optional[torch.Tensor] = None  # [L] the anchor op of each layer (anchor_steps > 1)
        self._anchor_age = 0  # forwards the current anchors have run
        self.hard_bits = self.paths is not None or bit_sampling == "hard"
        self.quantized = quantized
        self.tau = tau
        fixed = BitState.fixed(space.fixed_w_bits, space.fixed_a_bits) if quantized else BitState.float()
        self.stem = make_stem(space.in_channels, space.stem_channels, space.stem_kernel, space.stem_stride, fixed)
        self.mixed_layers = nn.ModuleList(MixedLayer(s, space.candidates, space.w_bits, space.a_bits, quantized)
                                          for s in space.layers())
        head_bits = BitState.fixed(space.fixed_w_bits, space.fixed_a_bits) if quantized else BitState.float()
        self.head = Head(space.last_stage_channels, space.head_channels, space.num_classes, head_bits)
        self.generator = torch.Generator().manual_seed(0)
        self._fixed: Optional[list[tuple[int, int, int]]] = None
        n_ops = len(space.candidates)
        rows = [l * n_ops + i for l, layer in enumerate(self.mixed_layers) for i in layer.bit_ops]
        self.register_buffer("bit_row_index", torch.tensor(rows, dtype=torch.long), persistent=False)
        self.register_buffer("bit_op_mask", self.op_has_bits(), persistent=False)
        self._op_convs = [[[m for m in op.modules() if isinstance(m, QConv2d)] for op in layer.ops]
                          for layer in self.mixed_layers]
        self._fixed_convs = [m for part in (self.stem, self.head) for m in part.modules()
                             if isinstance(m, (QConv2d, QLinear))]
        # the bit row (of the stacked w/a bit logits) of every op conv, in the order sample() lists running convs
        self._conv_bit_rows = [r for l, layer in enumerate(self.mixed_layers) for i in range(len(layer.ops))
                               for r in [self._bit_row(l, i)] * len(self._op_convs[l][i])]
        # the layout of the activations: set by use_channels_last (a stem over 1 input channel gives NCHW output
        # whatever the layout of its input and weight, and the layers keep the layout they are given)
        self.memory_format = torch.contiguous_format
        self.staged = False  # forwards read the sample stage_sample() copied to the device (CUDA graph capture)
        self._staged: Optional[torch.Tensor] = None
        self._prequantized: list[QConv2d] = []  # convs handed a batch-quantized weight for this forward
        self._prescaled: list[nn.Module] = []  # convs whose input quantizer got a batch-computed scale
        self._sampler_snapshot: Optional[tuple[torch.Tensor, Optional[torch.cuda.Event]]] = None
        self._weights: Optional[tuple[torch.Tensor, ...]] = None  # this forward's (ops, w, a, soft ops, soft w, soft a)

    # ------------------------------------------------------------------ parameters
    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.mixed_layers for p in layer.arch_parameters()]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    @property
    def bit_states(self) -> list[list[BitState]]:
        return [layer.bit_states for layer in self.mixed_layers]

    def use_channels_last(self) -> "Supernet":
        """Weights and activations in NHWC (channels-last) layout."""
        self.memory_format = torch.channels_last
        return self.to(memory_format=torch.channels_last)

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    # ------------------------------------------------------------------ sampling and forward
    def sample(self) -> None:
        """Draw one Gumbel sample for every layer's op and bit choices (batched across layers)."""
        logits = self._logits()
        host, choices = self._draw(logits)
        self._apply_sample(to_device_async(host, logits[0].device), choices, logits)

    def can_stage(self) -> bool:
        """Whether a forward's kernels are the same at every sample, so a step can be captured as a CUDA graph:
        every op runs (mode soft) and the sampled bits can be device data (weight bits >= 2)."""
        return self.paths is None and self._fixed is None and (
            not (self.hard_bits and self.quantized) or min(self.space.w_bits) >= 2)

    def stage_sample(self) -> None:
        """Draw the next sample on the host, as sample() does, and copy it into a device buffer that a staged
        forward (a captured CUDA graph) reads: the noise and the sampled bits' one-hots."""
        with torch.no_grad():
            host, _ = self._draw(self._logits())
        if self._staged is None or self._staged.numel() != host.numel():
            self._staged = torch.empty(host.numel(), device=self.mixed_layers[0].op_logits.device)
        self._staged.copy_(host.pin_memory() if self._staged.is_cuda else host, non_blocking=True)

    @contextmanager
    def staging(self):
        """Within the block, forwards are staged: they read the sample stage_sample() copied to the device (what
        a CUDA graph captures)."""
        self.staged = True
        try:
            yield
        finally:
            self.staged = False

    def _logits(self) -> list[torch.Tensor]:
        layers = self.mixed_layers
        return [torch.stack([l.op_logits for l in layers]), torch.cat([l.w_bit_logits for l in layers]),
                torch.cat([l.a_bit_logits for l in layers])]

    def _hards(self) -> tuple[bool, bool, bool]:
        """Which of (ops, w bits, a bits) are sampled one-hots (the others are plain Gumbel-softmax weights)."""
        return self.paths is not None, self.hard_bits, self.hard_bits

    def _draw(self, logits: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The host part of a sample from the stacked `logits` (_logits()): (the noise and the sampled one-hots
        in one flat host tensor, the sampled indices: ops [L, paths], w bits [R], a bits [R])."""
        # one noise draw (CPU generator: the same samples on every device); the sampled indices come from the
        # logits as of the previous forward (see _lagged_logits), so sampling never waits for the device
        sizes = [t.numel() for t in logits]
        noise_cpu = gumbel_noise((sum(sizes),), self.generator, "cpu")
        flat_cpu = self._lagged_logits(torch.cat([t.detach().reshape(-1) for t in logits]).float())
        noisy = [p.view_as(t) for t, p in zip(logits, (flat_cpu + noise_cpu).split(sizes))]
        op_idx = self._sample_ops(noisy[0])  # [L, paths]
        w_idx, a_idx = noisy[1].argmax(-1), noisy[2].argmax(-1)
        op_hot = torch.zeros_like(noisy[0]).scatter_(-1, op_idx, 1.0)
        host = [noise_cpu] + [hot.reshape(-1) for hot, h in zip(
            (op_hot, F.one_hot(w_idx, noisy[1].shape[-1]).float(), F.one_hot(a_idx, noisy[2].shape[-1]).float()),
            self._hards()) if h]
        return torch.cat(host), (op_idx, w_idx, a_idx)  # one asynchronous copy takes it to the device

    def _apply_sample(self, moved: torch.Tensor, choices: Optional[tuple[torch.Tensor, ...]],
                      logits: list[torch.Tensor]) -> None:
        """The device part of a sample: the relaxations and straight-through weights from the noise and one-hots
        in `moved` (on the device), and the bits of every running op. `choices` None (a staged forward): the
        sampled bits stay device data, read by the batched weight and activation quantizers."""
        layers = list(self.mixed_layers)
        sizes = [t.numel() for t in logits]
        hards = self._hards()
        parts = moved.split([sum(sizes)] + [n for n, h in zip(sizes, hards) if h])
        noise, raw_hots = parts[0].split(sizes), [p.view_as(t) for p, t in zip(
            parts[1:], [t for t, h in zip(logits, hards) if h])]
        one_hots = iter(raw_hots)
        (op_w, op_soft), (w_w, w_soft), (a_w, a_soft) = (
            gumbel_softmax_rows(t, n.view_as(t).to(t.dtype), next(one_hots).to(t.dtype) if h else None,
                                self.tau, restrict=k == 0 and (self.paths or 0) > 1)
            for k, (t, n, h) in enumerate(zip(logits, noise, hards)))
        full = [self._full_bit_matrix(rows, n) for rows, n in
                ((w_w, len(self.space.w_bits)), (a_w, len(self.space.a_bits)),
                 (w_soft, len(self.space.w_bits)), (a_soft, len(self.space.a_bits)))]
        self._weights = (op_w, full[0], full[1], op_soft, full[2], full[3])
        coef = op_w
        if self.hard_bits and self.quantized:
            coef = op_w * self._sampled_factor(full[0]) * self._sampled_factor(full[1])
        if choices is None:
            op_idx = w_idx = a_idx = None
        else:
            op_idx, w_idx, a_idx = (c.tolist() for c in choices)
        r = 0
        running_convs = []
        for li, layer in enumerate(layers):
            layer.last_op_weights, layer.last_w_weights, layer.last_a_weights = op_w[li], full[0][li], full[1][li]
            layer.last_coef = coef[li]
            running = op_idx[li] if self.paths and op_idx is not None else range(len(layer.ops))
            for i in running:
                running_convs += self._op_convs[li][i]
            layer.last_soft_op, layer.last_soft_w, layer.last_soft_a = op_soft[li], full[2][li], full[3][li]
            layer.last_indices = op_idx[li] if op_idx is not None else list(running)
            for r_op, i in enumerate(layer.bit_ops, start=r):
                st = layer.bit_states[i]
                st.clear()
                if self.paths and i not in running:
                    continue  # only the sampled ops run
                st.w_probs, st.a_probs = w_w[r_op], a_w[r_op]
                if self.hard_bits and w_idx is not None:
                    st.w_index, st.a_index = w_idx[r_op], a_idx[r_op]
            r += len(layer.bit_ops)
        if not self.quantized:
            return
        if self.hard_bits and choices is None:  # staged: the sampled bits as device data
            w_hot, a_hot = raw_hots[-2], raw_hots[-1]
            prequantize_weights_sampled(running_convs, self._conv_bit_rows, w_hot, self.space.w_bits)
            self._prequantized = running_convs
            prescale_activations_sampled(running_convs, self._conv_bit_rows, a_hot, self.space.a_bits)
            self._prescaled = running_convs + self._fixed_convs
            prescale_activations(self._fixed_convs, cached_tops=True)
            return
        if self.hard_bits:
            prequantize_weights(running_convs)
            self._prequantized = running_convs
        else:  # soft bits: every conv's mixtures in one batch (1-bit weights are quantized per conv)
            if 2 <= min(self.space.w_bits) and max(self.space.w_bits) < 32:
                prequantize_weights_mixed(running_convs, self._conv_bit_rows, w_w, self.space.w_bits)
                self._prequantized = running_convs
            prescale_activations_mixed(running_convs)
        self._prescaled = running_convs + self._fixed_convs
        prescale_activations(self._prescaled, cached_tops=choices is None)

    def _bit_row(self, layer_index: int, op_index: int) -> int:
        """The row of op `op_index` of a layer in the stacked bit logits; -1 for an op without bits."""
        start = sum(len(l.bit_ops) for l in list(self.mixed_layers)[:layer_index])
        bit_ops = self.mixed_layers[layer_index].bit_ops
        return start + bit_ops.index(op_index) if op_index in bit_ops else -1

    def _sample_ops(self, noisy: torch.Tensor) -> torch.Tensor:
        """[L, n_ops] noisy op logits -> [L, paths] indices of the ops to run: the largest noisy logits, or
        with anchors the held anchor first and the largest noisy logits of the other ops after it."""
        k = self.paths or 1
        if self.anchor_steps == 1:
            return noisy.topk(k, dim=-1).indices  # the largest first
        if self._anchors is None or self._anchor_age >= self.anchor_steps:
            self._anchors, self._anchor_age = noisy.argmax(-1), 0
        self._anchor_age += 1
        others = noisy.scatter(-1, self._anchors.unsqueeze(-1), float("-inf"))
        return torch.cat([self._anchors.unsqueeze(-1), others.topk(k - 1, dim=-1).indices], dim=-1)

    def _lagged_logits(self, flat: torch.Tensor) -> torch.Tensor:
        """The host copy of the arch logits that picks this forward's discrete choices: the logits as they were
        at the previous forward (one architecture update behind), on every device alike. Their copy to the
        host was started then, so it is done by now and the host never waits for the device (a blocking copy
        of the current logits would stall every step until the device drains its queue). The first forward,
        and the first after load_sampler_state(None), uses the current logits. The relaxation that carries
        the gradients always uses the current logits."""
        snapshot, event = copy_to_host_async(flat)
        previous, self._sampler_snapshot = self._sampler_snapshot, (snapshot, event)
        if previous is None:
            if event is not None:
                event.synchronize()
            return snapshot
        if previous[1] is not None:
            previous[1].synchronize()
        return previous[0]

    def sampler_state(self) -> dict:
        """What the next forward's discrete choices depend on besides the noise (for exact resume): the lagged
        logits and the held anchors with their age."""
        logits = None
        if self._sampler_snapshot is not None:
            snapshot, event = self._sampler_snapshot
            if event is not None:
                event.synchronize()
            logits = snapshot.clone()
        anchors = None if self._anchors is None else self._anchors.clone()
        return {"logits": logits, "anchors": anchors, "anchor_age": self._anchor_age}

    def load_sampler_state(self, state: Optional[dict | torch.Tensor]) -> None:
        """Restore sampler_state(); None starts afresh; a tensor (older checkpoints) is the lagged logits."""
        if state is None or isinstance(state, torch.Tensor):
            state = {"logits": state}
        logits, anchors = state.get("logits"), state.get("anchors")
        self._sampler_snapshot = None if logits is None else (logits.float().cpu(), None)
        self._anchors = None if anchors is None else anchors.long().cpu()
        self._anchor_age = int(state.get("anchor_age", 0))

    def _sampled_factor(self, one_hots: torch.Tensor) -> torch.Tensor:
        """[L, n_ops, n_bits] straight-through one-hots -> [L, n_ops] factors of value 1 whose gradient is that
        of the sampled option's relaxation (the max of a one-hot row is its sampled entry); 1 for ops without
        bits."""
        return torch.where(self.bit_op_mask, one_hots.amax(-1), 1.0)

    def _full_bit_matrix(self, rows: torch.Tensor, n_bits: int) -> torch.Tensor:
        """[R, n_bits] rows of the ops that have bits -> [L, n_ops, n_bits]; ops without weights get 1/n_bits."""
        L, n_ops = len(self.mixed_layers), len(self.space.candidates)
        full = torch.full((L * n_ops, n_bits), 1.0 / n_bits, device=rows.device, dtype=rows.dtype)
        return full.index_copy(0, self.bit_row_index, rows).view(L, n_ops, n_bits)

    def fix(self, choice: Optional[Sequence[tuple[int, int, int]]]) -> None:
        """Evaluate a given architecture (op, w_bits, a_bits indices per layer) until fix(None)."""
        self._fixed = list(choice) if choice is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fixed is not None:
            for layer, (i, wi, ai) in zip(self.mixed_layers, self._fixed):
                layer.fix(i, wi, ai)
            self._weights = None
            hard = True
        elif self.staged:
            if self._staged is None:
                raise RuntimeError("a staged forward needs stage_sample() first")
            self._apply_sample(self._staged, None, self._logits())
            hard = False
        else:
            self.sample()
            hard = self.paths is not None
        try:
            with deferred_range_updates(self.training):  # activation ranges move together, after the forward
                x = self.stem(x).contiguous(memory_format=self.memory_format)
                for layer in self.mixed_layers:
                    x = layer(x, hard)
                return self.head(x)
        finally:
            for conv in self._prequantized:  # a conv that did not run must not keep this sample's weight
                conv.prequantized = None
            for conv in self._prescaled:
                conv.act_quant.prescale = conv.act_quant.sampled = None
            self._prequantized, self._prescaled = [], []

    def release_sample(self) -> None:
        """Drop the tensors the last forward kept of its sample (relaxed weights, straight-through factors), and
        with them its autograd graph (fbnas.cuda_graph.GraphedGradients.capture needs that)."""
        self._weights = None
        for layer in self.mixed_layers:
            layer.last_op_weights = layer.last_w_weights = layer.last_a_weights = None
            layer.last_soft_op = layer.last_soft_w = layer.last_soft_a = layer.last_coef = None
            for st in layer.bit_states:
                st.clear()

    # ------------------------------------------------------------------ the sample as tensors
    def sample_weights(self, soft: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked weights of the current sample: ops [L, n_ops], w bits [L, n_ops, n_wb], a bits [L, n_ops, n_ab]."""
        if self._weights is not None:
            return self._weights[3:] if soft else self._weights[:3]
        layers = self.mixed_layers
        if soft:
            return (torch.stack([l.last_soft_op for l in layers]), torch.stack([l.last_soft_w for l in layers]),
                    torch.stack([l.last_soft_a for l in layers]))
        return (torch.stack([l.last_op_weights for l in layers]), torch.stack([l.last_w_weights for l in layers]),
                torch.stack([l.last_a_weights for l in layers]))

    def probabilities(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """softmax(theta), without noise: ops [L, n_ops], w bits [L, n_ops, n_wb], a bits [L, n_ops, n_ab]."""
        ops = torch.stack([F.softmax(l.op_logits, -1) for l in self.mixed_layers])
        layers = self.mixed_layers
        ws = self._full_bit_matrix(torch.cat([F.softmax(l.w_bit_logits, -1) for l in layers]), len(self.space.w_bits))
        as_ = self._full_bit_matrix(torch.cat([F.softmax(l.a_bit_logits, -1) for l in layers]), len(self.space.a_bits))
        return ops, ws, as_

    # ------------------------------------------------------------------ derivation
    def choice_to_arch(self, choice: Sequence[tuple[int, int, int]]) -> Arch:
        ops = [self.space.candidates[i] for i, _, _ in choice]
        wb = [self.space.w_bits[w] for _, w, _ in choice]
        ab = [self.space.a_bits[a] for _, _, a in choice]
        return Arch.from_space(self.space, ops, wb, ab)

    def argmax_choice(self) -> list[tuple[int, int, int]]:
        ops, ws, as_ = self.probabilities()
        out = []
        for l in range(len(self.mixed_layers)):
            i = int(ops[l].argmax())
            out.append((i, int(ws[l, i].argmax()), int(as_[l, i].argmax())))
        return out

    def sample_choices(self, k: int, generator: torch.Generator) -> list[list[tuple[int, int, int]]]:
        """k architectures drawn from softmax(theta) (no temperature), the argmax first."""
        ops, ws, as_ = (t.detach().cpu().double() for t in self.probabilities())
        choices = [self.argmax_choice()]
        for _ in range(max(k - 1, 0)):
            c = []
            for l in range(ops.shape[0]):
                i = int(torch.multinomial(ops[l], 1, generator=generator))
                c.append((i, int(torch.multinomial(ws[l, i], 1, generator=generator)),
                          int(torch.multinomial(as_[l, i], 1, generator=generator))))
            choices.append(c)
        return choices

    def op_has_bits(self) -> torch.Tensor:
        """[L, n_ops] bool: whether an op has quantized weights (and so bit choices)."""
        m = torch.zeros(len(self.mixed_layers), len(self.space.candidates), dtype=torch.bool)
        for l, layer in enumerate(self.mixed_layers):
            m[l, layer.bit_ops] = True
        return m


def expected_cost(table: torch.Tensor, ops: torch.Tensor, ws: torch.Tensor, as_: torch.Tensor) -> torch.Tensor:
    """sum_l sum_i m_li sum_{b,c} p_w[l,i,b] p_a[l,i,c] table[l,i,b,c]."""
    return torch.einsum("li,lib,lic,libc->", ops, ws, as_, table.to(ops.dtype))


def sample_cost(supernet: Supernet, table: torch.Tensor) -> torch.Tensor:
    """The cost (e.g. latency) of the current sample, computed from the same Gumbel weights as the forward.

    Soft and two_path modes: the expectation under the weights of the forward. Hard mode: the value is the
    sampled architecture's cost and the gradient is that of the soft relaxation (straight-through), so every op
    and bit logit gets one."""
    hard_val = expected_cost(table, *supernet.sample_weights(soft=False))
    if supernet.paths != 1 or supernet._fixed is not None:
        return hard_val
    soft_val = expected_cost(table, *supernet.sample_weights(soft=True))
    return hard_val.detach() + soft_val - soft_val.detach()


@torch.no_grad()
def argmax_cost(supernet: Supernet, table: torch.Tensor) -> torch.Tensor:
    """The cost of the architecture the search would derive now (the argmax of every op and bit logit, as
    argmax_choice), computed on the logits' device without a host read."""
    def one_hot(p: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(p, dtype=table.dtype).scatter_(-1, p.argmax(-1, keepdim=True), 1.0)

    ops, ws, as_ = supernet.probabilities()
    return expected_cost(table, one_hot(ops), one_hot(ws), one_hot(as_))

"""Exact channel padding of an IntegerNet for CPU int8 kernels.

onnxruntime's fast int8 convolutions on x86 (MLAS "symmetric" direct convs) take a depthwise conv only when its
channel count is a multiple of 16, and a dense conv only when its input channels are a multiple of 4; anything
else falls back to im2col + GEMM or a scalar depthwise loop, 2-4x slower (bench/onnx_int8_speed.py). Its float
path pads channels to its 16-wide blocks internally, so the int8 graph gets the same treatment here, on the
integer program itself:

  * a depthwise conv whose input comes only from a dense conv and whose output goes only to a dense conv gets
    zero channels up to the multiple: the producer writes them (zero weights and bias, so zero codes), the
    depthwise conv keeps them at zero, the consumer ignores them (zero weights);
  * a strided first conv (the usual stride-2 stem) reads its input rearranged by ONNX SpaceToDepth (b x b
    pixel blocks into channels) as a stride-1 conv with a ceil(k/b)-wide kernel and asymmetric padding: every
    original tap lands on one (channel, tap) of the new kernel, the others are zero weights. Same accumulators,
    and a 1-channel Fashion-MNIST stem becomes a 4-channel 2x2 conv (the fast kernel, a third of the taps);
  * the first conv's input channels, if still not a multiple of `input_channel_multiple` (1 for a stride-1 Fashion-MNIST
    stem), are padded with zero channels that the input quantizer appends (code = zero point, value 0) and zero
    weights.

Every padded channel is exactly zero, so logits (and every unpadded tensor) are bit-identical to the original
program's; tests/test_quant_align.py checks that, and the ONNX export of the aligned net against onnxruntime.
"""
from __future__ import annotations

import copy

import torch

from .fold import node_key
from .integer import IntConv, IntegerNet, conv_pads

DEFAULT_CHANNEL_MULTIPLE = 16
DEFAULT_INPUT_CHANNEL_MULTIPLE = 4


def _pad_dim(t: torch.Tensor, dim: int, extra: int, fill_from_first: bool = False) -> torch.Tensor:
    """t with `extra` entries appended along dim: zeros, or copies of the first entry (requantization
    multipliers and scales, which must stay valid for the zero channels)."""
    if extra <= 0:
        return t
    if fill_from_first:
        pad = t.narrow(dim, 0, 1).expand(*[extra if d == dim else s for d, s in enumerate(t.shape)])
    else:
        pad = t.new_zeros([extra if d == dim else s for d, s in enumerate(t.shape)])
    return torch.cat([t, pad], dim=dim)


def _pad_outputs(net: IntegerNet, step_name: str, extra: int) -> None:
    """Append `extra` zero output channels to a conv (weights, bias, multipliers, accumulator scale)."""
    node: IntConv = net.nodes[node_key(step_name)]
    node.weight = _pad_dim(node.weight, 0, extra)
    node.bias = _pad_dim(node.bias, 0, extra)
    if not node.raw and node.m.dim() == 1 and node.m.numel() > 1:
        node.m = _pad_dim(node.m, 0, extra, fill_from_first=True)
        node.c = _pad_dim(node.c, 0, extra, fill_from_first=True)
    s_acc = net.acc_scales[step_name].reshape(-1)
    net.acc_scales[step_name] = _pad_dim(s_acc, 0, extra, fill_from_first=True)


def _is_depthwise(node) -> bool:
    return isinstance(node, IntConv) and node.weight.shape[1] == 1 and node.groups == node.weight.shape[0] > 1


def _is_dense(node) -> bool:
    return isinstance(node, IntConv) and node.groups == 1 and type(node) is IntConv


def align_channels(integer: IntegerNet, multiple: int = DEFAULT_CHANNEL_MULTIPLE,
                   input_channel_multiple: int = DEFAULT_INPUT_CHANNEL_MULTIPLE, space_to_depth: bool = True
                   ) -> tuple[IntegerNet, dict[str, int]]:
    """A copy of `integer` laid out for onnxruntime's int8 kernels (module docstring); returns (aligned net,
    {step name: channels added, and "space_to_depth": block size if the first conv was rewritten})."""
    net = copy.deepcopy(integer)
    by_output = {st.output: st for st in net.steps}
    consumers: dict[str, list] = {}
    for st in net.steps:
        for t in st.inputs:
            consumers.setdefault(t, []).append(st)

    def node(st):
        key = node_key(st.name)
        return net.nodes[key] if key in net.nodes else None

    added: dict[str, int] = {}
    for st in net.steps:
        dw = node(st)
        if st.kind != "conv" or not _is_depthwise(dw) or dw.raw:
            continue
        channels = dw.weight.shape[0]
        extra = -channels % multiple
        producer = by_output.get(st.inputs[0])
        users = consumers.get(st.output, [])
        if (extra == 0 or producer is None or producer.kind != "conv" or not _is_dense(node(producer))
                or node(producer).raw or len(consumers[producer.output]) != 1
                or len(users) != 1 or users[0].kind != "conv" or not _is_dense(node(users[0]))):
            continue
        _pad_outputs(net, producer.name, extra)
        _pad_outputs(net, st.name, extra)
        dw.groups = channels + extra
        consumer = node(users[0])
        consumer.weight = _pad_dim(consumer.weight, 1, extra)
        added[st.name] = extra

    inp = next(st for st in net.steps if st.kind == "input")
    first = consumers.get(inp.output, [])
    if len(first) == 1 and first[0].kind == "conv" and _is_dense(node(first[0])):
        conv = node(first[0])
        if space_to_depth:
            block = _space_to_depth_first_conv(conv, net.arch.input_size)
            if block > 1:
                net.input_node.space_to_depth = block
                added["space_to_depth"] = block
        extra = -conv.weight.shape[1] % input_channel_multiple
        if extra > 0:
            conv.weight = _pad_dim(conv.weight, 1, extra)
            net.input_node.pad_channels = extra
            added[inp.name] = extra
    return net, added


def _space_to_depth_first_conv(conv: IntConv, size: int) -> int:
    """Rewrite a first conv of stride b > 1 (square, b dividing the input size) into the stride-1 conv over the
    SpaceToDepth(b) input with the same accumulators (module docstring); returns b, or 1 if it does not apply.
    Original tap a (offset a - pad from b*i) reads block row i + (a - pad) // b at phase (a - pad) % b."""
    (sh, sw), (pt, pl, pb, pr) = conv.stride, conv_pads(conv.padding)
    co, c, kh, kw = conv.weight.shape
    b = sh
    if b < 2 or sw != b or kh != kw or size % b or (pt, pl) != (pb, pr) or pt != pl:
        return 1
    pad = pt
    out = (size + 2 * pad - kh) // b + 1
    u_lo, u_hi = (-pad) // b, (kh - 1 - pad) // b
    k2 = u_hi - u_lo + 1
    bottom = max(0, (out - 1) + u_hi - (size // b - 1))
    if size // b - u_lo + bottom - k2 + 1 != out:  # the rewritten conv would not give the same output size
        return 1
    w2 = conv.weight.new_zeros((co, c * b * b, k2, k2))
    for a in range(kh):
        u, p = (a - pad) // b - u_lo, (a - pad) % b
        for a2 in range(kw):
            v, q = (a2 - pad) // b - u_lo, (a2 - pad) % b
            ch = (p * b + q) * c
            w2[:, ch:ch + c, u, v] = conv.weight[:, :, a, a2]
    conv.weight = w2
    conv.stride = (1, 1)
    conv.padding = (-u_lo, -u_lo, bottom, bottom)
    return b

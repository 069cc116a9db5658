"""Whole-model ONNX graphs of a trained fbnas network, emitted from the same program (`Step`s) that the folded
fake-quant and the integer-only models run, in three forms:

  fp32     the float network with BN folded (Conv, Relu, Add, Concat, Slice, shuffle, GlobalAveragePool, Gemm)
  qdq      QuantizeLinear/DequantizeLinear around float ops (opset 21): per-channel weight scales (int8 weights;
           int4 for w_bits <= 4), int32 bias at S_w*S_in, activations uint8 (8-bit) or uint4 (<= 4-bit) with zero
           point 0 (unsigned levels) or the mid level (signed). onnxruntime fuses the 8-bit patterns into
           QLinearConv, QLinearAdd, QLinearGlobalAveragePool and (the pooled codes are flattened before their DQ)
           the classifier into QGemm; an aligned net's extra input channels are padded onto the input codes.
  qlinear  an integer graph: QLinearConv (uint8 activations, int8 per-channel weights, int32 bias) for every conv,
           QLinearAdd / QLinearConcat (com.microsoft) for residual adds and concats, MatMulInteger for the
           classifier; the input quantizer and the pool use the integer model's exact arithmetic (float64
           multiply by m / 2^c, exact at these magnitudes, Round half to even, Clip, Cast). Activations of <= 4 bits
           travel in uint8 with a Clip to their levels.

Residual adds. The integer model keeps a conv's int32 accumulator when an add/concat consumes it and requantizes
each branch to the output scale on its own. Both graphs express that as the conv quantized straight to the
merge's output scale (a uint8 branch tensor, zero point 0 when a ReLU is pending, else 128), so onnxruntime
fuses it; then QLinearAdd adds an integer to the other branch's rounding, the same two roundings as ours. The
branch tensor saturates at [-128, 127] (or [0, 255]) output levels where ours does not; `exact_branches=True`
removes that (qlinear: ConvInteger + exact requantization; qdq: int16 Q/DQ) at the price of un-fused kernels.

The remaining differences from the integer model: onnxruntime requantizes in QLinearConv/QLinearAdd/QLinearConcat
with a float32 multiplier (x_scale*w_scale/y_scale) instead of our 31-bit dyadic one (1 LSB at rare near-ties);
the qdq graph also quantizes its input and runs un-fused (4-bit) layers in float32. `half_away` rounding is
exported for the requantizations we write; onnxruntime's own kernels round half to even.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..errors import ConfigError
from .fold import FoldedConv, FoldedNet, Step, node_key
from .integer import IntConv, IntegerNet, IntInput, IntLinear, IntMerge, IntPool, conv_pads

ONNX_IR_VERSION = 10  # onnxruntime 1.17+ reads IR 10 (opset 21, int4); newer onnx writes 11 by default
OPSET = 21
EXPORT_MODES = ("fp32", "qdq", "qlinear")


class _Graph:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self):
        from onnx import TensorProto

        self.tp = TensorProto
        self.nodes: list = []
        self.inits: list = []
        self._names: set[str] = {"input", "logits"}

    def fresh(self, base: str) -> str:
        base = base.replace("#", "_").replace("/", ".")
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, base: str, value, onnx_type: Optional[int] = None) -> str:
        from onnx import helper, numpy_helper

        name = self.fresh(base)
        if onnx_type in (self.tp.INT4, self.tp.UINT4):
            arr = np.asarray(value)
            self.inits.append(helper.make_tensor(name, onnx_type, list(arr.shape), arr.reshape(-1).tolist()))
        else:
            self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, domain: str = "", **attrs) -> str:
        from onnx import helper

        out = self.fresh(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.fresh(f"{base}:{op_type}"),
                                           domain=domain or None, **attrs))
        return out

    def model(self, name: str, x_shape: list, n_classes: int, extra_outputs: Optional[list] = None):
        from onnx import helper

        inputs = [helper.make_tensor_value_info("input", self.tp.FLOAT, ["N"] + list(x_shape))]
        outputs = [helper.make_tensor_value_info("logits", self.tp.FLOAT, ["N", n_classes])]
        for out_name, elem, shape in extra_outputs or []:
            outputs.append(helper.make_tensor_value_info(out_name, elem, ["N"] + list(shape)))
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="fbnas")
        model.ir_version = ONNX_IR_VERSION
        return model


def _f32(t) -> np.ndarray:
    return np.asarray(torch.as_tensor(t).detach().cpu().double().numpy(), dtype=np.float32)


def _f64(t) -> np.ndarray:
    return np.asarray(torch.as_tensor(t).detach().cpu().double().numpy(), dtype=np.float64)


def _per_channel_4d(v: np.ndarray) -> np.ndarray:
    return v.reshape(1, -1, 1, 1) if v.ndim == 1 and v.size > 1 else v.reshape(())


def _tensor_shapes(model: torch.nn.Module, x_shape: list) -> dict[str, tuple]:
    """Per-sample shape of every program tensor, by shape arithmetic over the steps (no forward pass, so an
    uncalibrated FoldedNet works too)."""
    shapes: dict[str, tuple] = {}
    for st in model.steps:
        key = node_key(st.name)
        node = model.nodes[key] if key in model.nodes else None
        src = shapes[st.inputs[0]] if st.inputs else None
        if st.kind == "input":
            b = getattr(node, "space_to_depth", 1)
            shapes[st.output] = (x_shape[0] * b * b + getattr(node, "pad_channels", 0), x_shape[1] // b, x_shape[2] // b)
        elif st.kind == "conv":
            co, _, kh, kw = node.weight.shape
            (sh, sw), (pt, pl, pb, pr) = node.stride, conv_pads(node.padding)
            shapes[st.output] = (co, (src[1] + pt + pb - kh) // sh + 1, (src[2] + pl + pr - kw) // sw + 1)
        elif st.kind == "concat":
            shapes[st.output] = (sum(shapes[t][0] for t in st.inputs),) + src[1:]
        elif st.kind == "split":
            a, b = st.attrs["channels"]
            shapes[st.output] = (b - a,) + src[1:]
        elif st.kind == "pool":
            shapes[st.output] = (src[0],)
        elif st.kind == "linear":
            shapes[st.output] = (node.weight.shape[0],)
        else:  # add, shuffle
            shapes[st.output] = src
    return shapes


def _shuffle(g: _Graph, t: str, shape: tuple, groups: int, base: str) -> str:
    c, h, w = shape
    r = g.op("Reshape", [t, g.const(f"{base}.shape5", np.array([0, groups, c // groups, h, w], np.int64))], base)
    r = g.op("Transpose", [r], base, perm=[0, 2, 1, 3, 4])
    return g.op("Reshape", [r, g.const(f"{base}.shape4", np.array([0, c, h, w], np.int64))], base)


def _slice(g: _Graph, t: str, a: int, b: int, base: str) -> str:
    return g.op("Slice", [t, g.const(f"{base}.starts", np.array([a], np.int64)),
                          g.const(f"{base}.ends", np.array([b], np.int64)),
                          g.const(f"{base}.axes", np.array([1], np.int64))], base)


def _layout(g: _Graph, st: Step, name: str, shapes: dict) -> str:
    """A split (channel Slice) or a channel shuffle of tensor `name`: data movement only, any element type."""
    if st.kind == "split":
        return _slice(g, name, *st.attrs["channels"], st.name)
    return _shuffle(g, name, shapes[st.inputs[0]], st.attrs["groups"], st.name)


def _input_layout(g: _Graph, integer: IntegerNet, codes: str, pad_value: Optional[str] = None) -> str:
    """The input codes as an aligned net's first conv reads them (quant.align): rearranged by SpaceToDepth, then
    zero channels appended (pad_value: the zero point, the code of 0)."""
    node = integer.input_node
    if node.space_to_depth > 1:
        codes = g.op("SpaceToDepth", [codes], "input.s2d", blocksize=node.space_to_depth)
    if node.pad_channels:
        pads = g.const("input.pads", np.array([0, 0, 0, 0, 0, node.pad_channels, 0, 0], np.int64))
        codes = g.op("Pad", [codes, pads] + ([pad_value] if pad_value else []), "input")
    return codes


def conv_attrs(node) -> dict:
    w = node.weight
    return {"kernel_shape": list(w.shape[2:]), "pads": list(conv_pads(node.padding)), "strides": list(node.stride),
            "group": int(node.groups)}


# ---------------------------------------------------------------------------------------------- fp32

def fp32_graph(folded: FoldedNet):
    """The float network of `folded` (BN folded with running statistics, no quantization), as ONNX."""
    arch = folded.arch
    x_shape = [arch.in_channels, arch.input_size, arch.input_size]
    shapes = _tensor_shapes(folded, x_shape)
    g = _Graph()
    env: dict[str, str] = {}
    for st in folded.steps:
        node = folded.nodes[node_key(st.name)] if node_key(st.name) in folded.nodes else None
        if st.kind == "input":
            env[st.output] = "input"
        elif st.kind == "conv":
            w = g.const(f"{st.name}.weight", _f32(node.weight))
            b = g.const(f"{st.name}.bias", _f32(node.bias))
            y = g.op("Conv", [env[st.inputs[0]], w, b], st.name, **conv_attrs(node))
            if node.relu and not node.raw:
                y = g.op("Relu", [y], st.name)
            env[st.output] = y
        elif st.kind in ("add", "concat"):
            parts = [g.op("Relu", [env[t]], st.name) if relu else env[t] for t, relu in zip(st.inputs, node.relus)]
            y = g.op("Add", parts, st.name) if st.kind == "add" else g.op("Concat", parts, st.name, axis=1)
            env[st.output] = y
        elif st.kind in ("split", "shuffle"):
            env[st.output] = _layout(g, st, env[st.inputs[0]], shapes)
        elif st.kind == "pool":
            p = g.op("GlobalAveragePool", [env[st.inputs[0]]], st.name)
            env[st.output] = g.op("Flatten", [p], st.name, axis=1)
        elif st.kind == "linear":
            w = g.const(f"{st.name}.weight", _f32(node.weight))
            b = g.const(f"{st.name}.bias", _f32(node.bias))
            g.nodes.append(_gemm(g, env[st.inputs[0]], w, b, st.name, "logits"))
    return g.model("fbnas_fp32", x_shape, arch.num_classes)


def _gemm(g: _Graph, x: str, w: str, b: str, base: str, out: str):
    from onnx import helper

    return helper.make_node("Gemm", [x, w, b], [out], name=g.fresh(f"{base}:Gemm"), transB=1)


# ------------------------------------------------------------------------------- integer tensor types

def _container(levels: tuple[int, int], four_bit: bool) -> tuple[int, int, int]:
    """(onnx type, zero point, container bits) of a tensor with integer levels [lo, hi]; unsigned levels get
    zero point 0, signed ones the mid level. four_bit allows uint4 containers (qdq form)."""
    from onnx import TensorProto

    lo, hi = levels
    if four_bit and ((lo >= 0 and hi <= 15) or (lo >= -8 and hi <= 7)):
        return TensorProto.UINT4, (0 if lo >= 0 else 8), 4
    if (lo >= 0 and hi <= 255) or (lo >= -128 and hi <= 127):
        return TensorProto.UINT8, (0 if lo >= 0 else 128), 8
    raise ConfigError(f"activation levels [{lo}, {hi}] do not fit an 8-bit container; ONNX export needs a_bits <= 8")


def _weight_type(w_bits: int) -> int:
    from onnx import TensorProto

    return TensorProto.INT4 if w_bits <= 4 else TensorProto.INT8


def _w_bits(weight: torch.Tensor) -> int:
    m = int(weight.abs().max()) if weight.numel() else 0
    return 4 if m <= 7 else 8


def raw_branches(integer: IntegerNet) -> dict[str, tuple[str, bool]]:
    """raw accumulator tensor -> (the add/concat output it feeds, whether its ReLU is pending)."""
    raw = {st.output for st in integer.steps if st.kind == "conv" and integer.nodes[node_key(st.name)].raw}
    out = {}
    for st in integer.steps:
        if st.kind in ("add", "concat"):
            merge = integer.nodes[node_key(st.name)]
            for t, relu in zip(st.inputs, merge.relus):
                if t in raw:
                    out[t] = (st.output, bool(relu))
    return out


# ------------------------------------------------------------------------------------------------ qdq

def qdq_graph(integer: IntegerNet, debug_outputs: bool = False, exact_branches: bool = False):
    """The QDQ form of `integer` (see the module docstring). With debug_outputs, every quantized tensor is also
    a graph output; returns (model, {tensor: (output name, zero point, scale)}) (see `debug_codes`)."""
    from onnx import TensorProto

    arch = integer.arch
    x_shape = [arch.in_channels, arch.input_size, arch.input_size]
    shapes = _tensor_shapes(integer, x_shape)
    g = _Graph()
    env: dict[str, str] = {}  # tensor -> float name (dequantized value, or a raw conv's real output)
    extra: list = []
    debug_names: dict[str, tuple[str, int, Optional[float]]] = {}

    def quantize(t: str, real: str, base: str, flatten: bool = False, layout_input: bool = False) -> str:
        """Q then DQ of a float tensor at tensor t's scale and levels; returns the dequantized name. flatten: the
        pooled (N, C, 1, 1) codes are flattened before the DQ, so that onnxruntime sees DQ -> Gemm and fuses the
        classifier into an integer QGemm."""
        s = integer.scales[t]
        elem, zp, _ = _container(integer.levels[t], four_bit=True)
        sc = g.const(f"{base}.scale", _f32(s).reshape(()))
        z = g.const(f"{base}.zero_point", np.array(zp), elem) if elem == TensorProto.UINT4 else \
            g.const(f"{base}.zero_point", np.array(zp, np.uint8))
        q = g.op("QuantizeLinear", [real, sc, z], f"{base}.q")
        if flatten:
            q = g.op("Flatten", [q], base, axis=1)
        if layout_input:  # an aligned net's input codes (quant.align)
            q = _input_layout(g, integer, q, z)
        dq = g.op("DequantizeLinear", [q, sc, z], f"{base}.dq")
        if debug_outputs:  # the dequantized values (uint4 codes have no numpy type); codes = dq / scale
            extra.append((dq, TensorProto.FLOAT, shapes[t] + ((1, 1) if len(shapes[t]) == 1 and not flatten else ())))
            debug_names[t] = (dq, 0, float(_f32(s)))
        return dq

    def quantize_branch(t: str, real: str, base: str) -> str:
        """A raw accumulator requantized on its own to the scale of the add/concat that consumes it (uint8, zero
        point 0 when a ReLU is pending, so that saturation is the ReLU, else 128), dequantized."""
        merge, relu = branches[t]
        sc = g.const(f"{base}.scale", _f32(integer.scales[merge]).reshape(()))
        if exact_branches:  # int16 never saturates; onnxruntime then runs this conv in float
            z = g.const(f"{base}.zero_point", np.array(0, np.int16))
            real = g.op("Relu", [real], base) if relu else real
        else:
            z = g.const(f"{base}.zero_point", np.array(0 if relu else 128, np.uint8))
        return g.op("DequantizeLinear", [g.op("QuantizeLinear", [real, sc, z], f"{base}.q"), sc, z], f"{base}.dq")

    branches = raw_branches(integer)
    for st in integer.steps:
        key = node_key(st.name)
        node = integer.nodes[key] if key in integer.nodes else None
        if st.kind == "input":
            env[st.output] = quantize(st.output, "input", "input", layout_input=True)
        elif st.kind in ("conv", "linear"):
            s_acc = integer.acc_scales[st.name]
            s_in = integer.scales[st.inputs[0]]
            s_w = (s_acc / s_in.double()).reshape(-1)
            wq = node.weight.cpu().numpy()
            wt = _weight_type(_w_bits(node.weight))
            w_dq = g.op("DequantizeLinear", [g.const(f"{st.name}.weight_q", wq, wt),
                                             g.const(f"{st.name}.weight_scale", _f32(s_w)),
                                             g.const(f"{st.name}.weight_zp", np.zeros(wq.shape[0], np.int8)
                                                     if wt == TensorProto.INT8 else np.zeros(wq.shape[0], np.int64),
                                                     None if wt == TensorProto.INT8 else wt)],
                        f"{st.name}.weight", axis=0)
            b_dq = g.op("DequantizeLinear", [g.const(f"{st.name}.bias_q", node.bias.cpu().numpy().astype(np.int32)),
                                             g.const(f"{st.name}.bias_scale", _f32(s_acc.reshape(-1))),
                                             g.const(f"{st.name}.bias_zp", np.zeros(wq.shape[0], np.int32))],
                        f"{st.name}.bias", axis=0)
            x = env[st.inputs[0]]
            if st.kind == "linear":
                g.nodes.append(_gemm(g, x, w_dq, b_dq, st.name, "logits"))
                continue
            y = g.op("Conv", [x, w_dq, b_dq], st.name, **conv_attrs(node))
            # a ReLU is the quantizer's saturation at zero point 0 (levels [0, hi])
            env[st.output] = quantize_branch(st.output, y, st.name) if node.raw else quantize(st.output, y, st.name)
        elif st.kind in ("add", "concat"):
            parts = [env[t] for t in st.inputs]
            y = g.op("Add", parts, st.name) if st.kind == "add" else g.op("Concat", parts, st.name, axis=1)
            env[st.output] = quantize(st.output, y, st.name)
        elif st.kind in ("split", "shuffle"):
            env[st.output] = _layout(g, st, env[st.inputs[0]], shapes)
        elif st.kind == "pool":
            p = g.op("GlobalAveragePool", [env[st.inputs[0]]], st.name)
            env[st.output] = quantize(st.output, p, st.name, flatten=True)
    model = g.model("fbnas_qdq", x_shape, arch.num_classes, extra if debug_outputs else None)
    return (model, debug_names) if debug_outputs else model


# -------------------------------------------------------------------------------------------- qlinear

def qlinear_graph(integer: IntegerNet, debug_outputs: bool = False, exact_branches: bool = False):
    """The integer (QOperator) form of `integer` (see the module docstring). With debug_outputs, every quantized
    program tensor is also a graph output (uint8 codes); returns (model, {tensor: (output name, zero point,
    None)}, names of the tensors that QLinearConv produces)."""
    return _QLinearEmitter(integer, exact_branches).build(debug_outputs)


class _QLinearEmitter:
    """Emits the QOperator graph of an IntegerNet step by step; `env` maps each program tensor to its
    (uint8 graph tensor, zero point, scale)."""

    def __init__(self, integer: IntegerNet, exact_branches: bool):
        arch = integer.arch
        self.integer, self.exact_branches = integer, exact_branches
        self.x_shape = [arch.in_channels, arch.input_size, arch.input_size]
        self.shapes = _tensor_shapes(integer, self.x_shape)
        self.g = _Graph()
        self.env: dict[str, tuple[str, int, torch.Tensor]] = {}
        self.branches = raw_branches(integer)
        self.qlinear_tensors: list[str] = []

    def build(self, debug_outputs: bool):
        from onnx import TensorProto

        integer, env = self.integer, self.env
        extra: list = []
        debug: dict[str, tuple[str, int, Optional[float]]] = {}
        for st in integer.steps:
            key = node_key(st.name)
            node = integer.nodes[key] if key in integer.nodes else None
            if st.kind == "input":
                self.input(st, node)
            elif st.kind == "conv":
                self.conv(st, node)
            elif st.kind in ("add", "concat"):
                (self.merge_exact if self.exact_branches else self.merge)(st, node)
            elif st.kind in ("split", "shuffle"):
                name, zp, sc = env[st.inputs[0]]
                env[st.output] = (_layout(self.g, st, name, self.shapes), zp, sc)
            elif st.kind == "pool":
                self.pool(st, node)
            elif st.kind == "linear":
                self.linear(st, node)
            if debug_outputs and st.output in env and st.output not in self.branches:
                name, zp, _ = env[st.output]
                debug[st.output] = (name, zp, None)
                extra.append((name, TensorProto.UINT8, self.shapes[st.output]))
        model = self.g.model("fbnas_qlinear", self.x_shape, integer.arch.num_classes,
                             extra if debug_outputs else None)
        if debug_outputs:
            return model, debug, self.qlinear_tensors
        return model

    # ------------------------------------------------------------------ float64 arithmetic on codes
    def round_(self, v: str, base: str) -> str:
        g = self.g
        if self.integer.rounding == "half_even":
            return g.op("Round", [v], base)
        half = g.const(f"{base}.half", np.array(0.5, np.float64))
        mag = g.op("Floor", [g.op("Add", [g.op("Abs", [v], base), half], base)], base)
        return g.op("Mul", [g.op("Sign", [v], base), mag], base)

    def to_codes(self, v: str, levels: tuple[int, int], zp: int, base: str) -> str:
        """float64 integer values -> Clip to levels -> + zero point -> uint8."""
        from onnx import TensorProto

        g = self.g
        lo, hi = levels
        c = g.op("Clip", [v, g.const(f"{base}.lo", np.array(lo, np.float64)),
                          g.const(f"{base}.hi", np.array(hi, np.float64))], base)
        if zp:
            c = g.op("Add", [c, g.const(f"{base}.zp", np.array(zp, np.float64))], base)
        return g.op("Cast", [c], base, to=TensorProto.UINT8)

    def clip_levels(self, y: str, levels: tuple[int, int], zp: int, base: str) -> str:
        """Levels narrower than uint8 (<= 4-bit, or signed 8-bit's -127): a Clip on the codes."""
        if (levels[0] + zp, levels[1] + zp) == (0, 255):
            return y
        return self.g.op("Clip", [y, self.g.const(f"{base}.lo", np.array(levels[0] + zp, np.uint8)),
                                  self.g.const(f"{base}.hi", np.array(levels[1] + zp, np.uint8))], base)

    def qparams(self, base: str, scale: torch.Tensor, zp: int) -> list[str]:
        return [self.g.const(f"{base}.scale", _f32(scale).reshape(())),
                self.g.const(f"{base}.zp", np.array(zp, np.uint8))]

    def dyadic_mul(self, v: str, m: torch.Tensor, c: torch.Tensor, base: str) -> str:
        mult = torch.ldexp(m.double().cpu(), -c.double().cpu()).numpy()  # m / 2^c, exact in float64
        return self.round_(self.g.op("Mul", [v, self.g.const(f"{base}.mult", mult)], base), base)

    # ------------------------------------------------------------------ one method per step kind
    def input(self, st: Step, node) -> None:
        from onnx import TensorProto

        g, integer = self.g, self.integer
        lo, hi = integer.levels[st.output]
        _, zp, _ = _container((lo, hi), four_bit=False)
        v = g.op("Cast", ["input"], "input", to=TensorProto.DOUBLE)
        v = g.op("Div", [v, g.const("input.scale", _f64(node.scale).reshape(()))], "input")
        codes = self.to_codes(self.round_(v, "input"), (lo, hi), zp, "input")
        zp_code = g.const("input.pad_value", np.array(zp, np.uint8))
        self.env[st.output] = (_input_layout(g, integer, codes, zp_code), zp, integer.scales[st.output])

    def conv(self, st: Step, node) -> None:
        g, integer = self.g, self.integer
        x, zp_in, s_in = self.env[st.inputs[0]]
        s_acc = integer.acc_scales[st.name]
        if node.raw and self.exact_branches:  # int32 accumulator, requantized exactly by the merge
            acc = g.op("ConvInteger", [x, g.const(f"{st.name}.weight_q", node.weight.cpu().numpy().astype(np.int8)),
                                       g.const(f"{st.name}.x_zp", np.array(zp_in, np.uint8))], st.name,
                       **conv_attrs(node))
            bias = node.bias.cpu().numpy().astype(np.int32).reshape(1, -1, 1, 1)
            self.env[st.output] = (g.op("Add", [acc, g.const(f"{st.name}.bias_q", bias)], st.name), None, s_acc)
            return
        if node.raw:  # requantized on its own to the consuming add/concat's scale (zero point 0 = its ReLU)
            merge, relu = self.branches[st.output]
            s_out, zp, levels = integer.scales[merge], (0 if relu else 128), None
        else:
            s_out, levels = integer.scales[st.output], (node.lo, node.hi)
            _, zp, _ = _container(levels, four_bit=False)
        y = g.op("QLinearConv", [x, *self.qparams(f"{st.name}.x", s_in, zp_in),
                                 g.const(f"{st.name}.weight_q", node.weight.cpu().numpy().astype(np.int8)),
                                 g.const(f"{st.name}.w_scale", _f32((s_acc / s_in.double()).reshape(-1))),
                                 g.const(f"{st.name}.w_zp", np.zeros(node.weight.shape[0], np.int8)),
                                 *self.qparams(f"{st.name}.y", s_out, zp),
                                 g.const(f"{st.name}.bias_q", node.bias.cpu().numpy().astype(np.int32))],
                 st.name, **conv_attrs(node))
        if levels is not None:
            y = self.clip_levels(y, levels, zp, st.name)
            self.qlinear_tensors.append(st.output)
        self.env[st.output] = (y, zp, s_out)

    def merge_exact(self, st: Step, node) -> None:
        """add / concat from int32 accumulators or codes, each input requantized exactly in float64."""
        from onnx import TensorProto

        g = self.g
        parts = []
        for i, t in enumerate(st.inputs):
            name, zp_in, _ = self.env[t]
            v = g.op("Cast", [name], f"{st.name}.in{i}", to=TensorProto.DOUBLE)
            if zp_in:
                v = g.op("Sub", [v, g.const(f"{st.name}.in{i}.zp", np.array(zp_in, np.float64))], st.name)
            m, c = getattr(node, f"m{i}"), getattr(node, f"c{i}")
            mult = torch.ldexp(m.double().cpu(), -c.double().cpu()).numpy()
            v = self.round_(g.op("Mul", [v, g.const(f"{st.name}.in{i}.mult", _per_channel_4d(mult))], st.name),
                            st.name)
            parts.append(g.op("Relu", [v], st.name) if node.relus[i] else v)
        y = g.op("Add", parts, st.name) if st.kind == "add" else g.op("Concat", parts, st.name, axis=1)
        _, zp, _ = _container((node.lo, node.hi), four_bit=False)
        self.env[st.output] = (self.to_codes(y, (node.lo, node.hi), zp, st.name), zp, self.integer.scales[st.output])

    def merge(self, st: Step, node) -> None:
        """add / concat as onnxruntime's QLinearAdd / QLinearConcat."""
        g, env = self.g, self.env
        s_out = self.integer.scales[st.output]
        levels = (node.lo, node.hi)
        _, zp, _ = _container(levels, four_bit=False)
        ins = [[env[t][0], *self.qparams(f"{st.name}.in{i}", env[t][2], env[t][1])] for i, t in enumerate(st.inputs)]
        if st.kind == "add":
            y = g.op("QLinearAdd", ins[0] + ins[1] + self.qparams(f"{st.name}.y", s_out, zp), st.name,
                     domain="com.microsoft")
        else:
            y = g.op("QLinearConcat", self.qparams(f"{st.name}.y", s_out, zp) + [n for i in ins for n in i], st.name,
                     domain="com.microsoft", axis=1)
        env[st.output] = (self.clip_levels(y, levels, zp, st.name), zp, s_out)

    def pool(self, st: Step, node) -> None:
        """Exact: integer sum, then the dyadic multiplier (one small tensor)."""
        from onnx import TensorProto

        g = self.g
        name, zp_in, _ = self.env[st.inputs[0]]
        v = g.op("Cast", [name], st.name, to=TensorProto.DOUBLE)
        if zp_in:
            v = g.op("Sub", [v, g.const(f"{st.name}.x_zp", np.array(zp_in, np.float64))], st.name)
        total = g.op("ReduceSum", [v, g.const(f"{st.name}.axes", np.array([2, 3], np.int64))], st.name, keepdims=0)
        _, zp, _ = _container((node.lo, node.hi), four_bit=False)
        codes = self.to_codes(self.dyadic_mul(total, node.m, node.c, st.name), (node.lo, node.hi), zp, st.name)
        self.env[st.output] = (codes, zp, self.integer.scales[st.output])

    def linear(self, st: Step, node) -> None:
        from onnx import TensorProto, helper

        g = self.g
        x, zp_in, _ = self.env[st.inputs[0]]
        acc = g.op("MatMulInteger", [x, g.const(f"{st.name}.weight_q", np.ascontiguousarray(
            node.weight.cpu().numpy().astype(np.int8).T)), g.const(f"{st.name}.x_zp", np.array(zp_in, np.uint8))],
                   st.name)
        acc = g.op("Add", [acc, g.const(f"{st.name}.bias_q", node.bias.cpu().numpy().astype(np.int32))], st.name)
        v = g.op("Mul", [g.op("Cast", [acc], st.name, to=TensorProto.DOUBLE),
                         g.const(f"{st.name}.dequant_scale", _f64(node.deq_scale))], st.name)
        g.nodes.append(helper.make_node("Cast", [v], ["logits"], name=g.fresh(f"{st.name}:Cast"),
                                        to=TensorProto.FLOAT))


# ----------------------------------------------------------------------------------------------- API

def debug_codes(value: np.ndarray, zero_point: int, scale: Optional[float]) -> np.ndarray:
    """Integer codes (int64, zero point removed) of a debug output: codes directly, or dequantized / scale."""
    if scale is None:
        return value.astype(np.int64) - zero_point
    return np.rint(value.astype(np.float64) / scale).astype(np.int64)


def export_graph(mode: str, integer: Optional[IntegerNet] = None, folded: Optional[FoldedNet] = None,
                 exact_branches: bool = False):
    """The ONNX ModelProto of one form: fp32 needs `folded` (any FoldedNet, calibrated or not), qdq and qlinear
    need `integer`."""
    if mode == "fp32":
        return fp32_graph(folded)
    if mode == "qdq":
        return qdq_graph(integer, exact_branches=exact_branches)
    if mode == "qlinear":
        return qlinear_graph(integer, exact_branches=exact_branches)
    raise ConfigError(f"field 'mode' is {mode!r}; choose one of {', '.join(EXPORT_MODES)}")


def save_onnx(model, path) -> None:
    """Check the graph with onnx.checker and write it atomically."""
    import onnx

    from ..io import atomic_write_bytes

    onnx.checker.check_model(model)
    atomic_write_bytes(path, model.SerializeToString())


def has_4bit_activations(model) -> bool:
    from onnx import TensorProto

    return any(n.op_type == "QuantizeLinear" and any(
        i.name == n.input[2] and i.data_type in (TensorProto.UINT4, TensorProto.INT4) for i in model.graph.initializer)
        for n in model.graph.node if len(n.input) > 2)


def ort_session(model, threads: int = 1, optimize: bool = True, profile_prefix: Optional[str] = None,
                optimized_path: Optional[str] = None):
    """An onnxruntime CPU session (all graph optimisations unless optimize=False; `threads` intra-op threads,
    sequential). onnxruntime's QDQ fuser turns DQ(uint4) -> Conv -> Q into a QLinearConv that rejects uint4
    inputs, so it is disabled for graphs with 4-bit activations (those run their Q/DQ pairs as written).
    profile_prefix: profile every run into <prefix>*.json; optimized_path: write the optimized graph there."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    if isinstance(model, (bytes, str)):
        import onnx

        model = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
    disabled = ["QDQSelectorActionTransformer"] if optimize and has_4bit_activations(model) else None
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)

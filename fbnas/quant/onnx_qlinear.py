"""The integer (QOperator) ONNX graph of a trained fbnas network: QLinearConv, QLinearAdd / QLinearConcat,
MatMulInteger (see fbnas.quant.onnx_graph's docstring for the three forms and their differences)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .fold import Step, node_key
from .integer import IntegerNet
from .onnx_build import (Graph, container, conv_attrs, f32, f64, input_layout, layout, per_channel_4d, raw_branches,
                         tensor_shapes)


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
        self.shapes = tensor_shapes(integer, self.x_shape)
        self.g = Graph()
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
                env[st.output] = (layout(self.g, st, name, self.shapes), zp, sc)
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
        return [self.g.const(f"{base}.scale", f32(scale).reshape(())),
                self.g.const(f"{base}.zp", np.array(zp, np.uint8))]

    def dyadic_mul(self, v: str, m: torch.Tensor, c: torch.Tensor, base: str) -> str:
        mult = torch.ldexp(m.double().cpu(), -c.double().cpu()).numpy()  # m / 2^c, exact in float64
        return self.round_(self.g.op("Mul", [v, self.g.const(f"{base}.mult", mult)], base), base)

    # ------------------------------------------------------------------ one method per step kind
    def input(self, st: Step, node) -> None:
        from onnx import TensorProto

        g, integer = self.g, self.integer
        lo, hi = integer.levels[st.output]
        _, zp, _ = container((lo, hi), four_bit=False)
        v = g.op("Cast", ["input"], "input", to=TensorProto.DOUBLE)
        v = g.op("Div", [v, g.const("input.scale", f64(node.scale).reshape(()))], "input")
        codes = self.to_codes(self.round_(v, "input"), (lo, hi), zp, "input")
        zp_code = g.const("input.pad_value", np.array(zp, np.uint8))
        self.env[st.output] = (input_layout(g, integer, codes, zp_code), zp, integer.scales[st.output])

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
            _, zp, _ = container(levels, four_bit=False)
        y = g.op("QLinearConv", [x, *self.qparams(f"{st.name}.x", s_in, zp_in),
                                 g.const(f"{st.name}.weight_q", node.weight.cpu().numpy().astype(np.int8)),
                                 g.const(f"{st.name}.w_scale", f32((s_acc / s_in.double()).reshape(-1))),
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
            v = self.round_(g.op("Mul", [v, g.const(f"{st.name}.in{i}.mult", per_channel_4d(mult))], st.name),
                            st.name)
            parts.append(g.op("Relu", [v], st.name) if node.relus[i] else v)
        y = g.op("Add", parts, st.name) if st.kind == "add" else g.op("Concat", parts, st.name, axis=1)
        _, zp, _ = container((node.lo, node.hi), four_bit=False)
        self.env[st.output] = (self.to_codes(y, (node.lo, node.hi), zp, st.name), zp, self.integer.scales[st.output])

    def merge(self, st: Step, node) -> None:
        """add / concat as onnxruntime's QLinearAdd / QLinearConcat."""
        g, env = self.g, self.env
        s_out = self.integer.scales[st.output]
        levels = (node.lo, node.hi)
        _, zp, _ = container(levels, four_bit=False)
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
        _, zp, _ = container((node.lo, node.hi), four_bit=False)
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
                         g.const(f"{st.name}.dequant_scale", f64(node.deq_scale))], st.name)
        g.nodes.append(helper.make_node("Cast", [v], ["logits"], name=g.fresh(f"{st.name}:Cast"),
                                        to=TensorProto.FLOAT))

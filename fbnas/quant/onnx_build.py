"""Building blocks of the ONNX graphs (fbnas.quant.onnx_graph, fbnas.quant.onnx_qlinear): a graph under
construction, tensor conversions, program tensor shapes and layout ops, and the integer tensor types of a bit-width."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..errors import ConfigError
from .fold import Step, node_key
from .integer import IntegerNet, conv_pads

ONNX_IR_VERSION = 10  # onnxruntime 1.17+ reads IR 10 (opset 21, int4); newer onnx writes 11 by default
OPSET = 21
EXPORT_MODES = ("fp32", "qdq", "qlinear")


class Graph:
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


def f32(t) -> np.ndarray:
    return np.asarray(torch.as_tensor(t).detach().cpu().double().numpy(), dtype=np.float32)


def f64(t) -> np.ndarray:
    return np.asarray(torch.as_tensor(t).detach().cpu().double().numpy(), dtype=np.float64)


def per_channel_4d(v: np.ndarray) -> np.ndarray:
    return v.reshape(1, -1, 1, 1) if v.ndim == 1 and v.size > 1 else v.reshape(())


def tensor_shapes(model: torch.nn.Module, x_shape: list) -> dict[str, tuple]:
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


def shuffle_channels(g: Graph, t: str, shape: tuple, groups: int, base: str) -> str:
    c, h, w = shape
    r = g.op("Reshape", [t, g.const(f"{base}.shape5", np.array([0, groups, c // groups, h, w], np.int64))], base)
    r = g.op("Transpose", [r], base, perm=[0, 2, 1, 3, 4])
    return g.op("Reshape", [r, g.const(f"{base}.shape4", np.array([0, c, h, w], np.int64))], base)


def slice_channels(g: Graph, t: str, a: int, b: int, base: str) -> str:
    return g.op("Slice", [t, g.const(f"{base}.starts", np.array([a], np.int64)),
                          g.const(f"{base}.ends", np.array([b], np.int64)),
                          g.const(f"{base}.axes", np.array([1], np.int64))], base)


def layout(g: Graph, st: Step, name: str, shapes: dict) -> str:
    """A split (channel Slice) or a channel shuffle of tensor `name`: data movement only, any element type."""
    if st.kind == "split":
        return slice_channels(g, name, *st.attrs["channels"], st.name)
    return shuffle_channels(g, name, shapes[st.inputs[0]], st.attrs["groups"], st.name)


def input_layout(g: Graph, integer: IntegerNet, codes: str, pad_value: Optional[str] = None) -> str:
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


def gemm(g: Graph, x: str, w: str, b: str, base: str, out: str):
    from onnx import helper

    return helper.make_node("Gemm", [x, w, b], [out], name=g.fresh(f"{base}:Gemm"), transB=1)


# ------------------------------------------------------------------------------- integer tensor types

def container(levels: tuple[int, int], four_bit: bool) -> tuple[int, int, int]:
    """(onnx type, zero point, container bits) of a tensor with integer levels [lo, hi]; unsigned levels get
    zero point 0, signed ones the mid level. four_bit allows uint4 containers (qdq form)."""
    from onnx import TensorProto

    lo, hi = levels
    if four_bit and ((lo >= 0 and hi <= 15) or (lo >= -8 and hi <= 7)):
        return TensorProto.UINT4, (0 if lo >= 0 else 8), 4
    if (lo >= 0 and hi <= 255) or (lo >= -128 and hi <= 127):
        return TensorProto.UINT8, (0 if lo >= 0 else 128), 8
    raise ConfigError(f"activation levels [{lo}, {hi}] do not fit an 8-bit container; ONNX export needs a_bits <= 8")


def weight_type(w_bits: int) -> int:
    from onnx import TensorProto

    return TensorProto.INT4 if w_bits <= 4 else TensorProto.INT8


def weight_bits(weight: torch.Tensor) -> int:
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

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

from ..errors import ConfigError
from .fold import FoldedNet, node_key
from .integer import IntegerNet
from .onnx_build import (EXPORT_MODES, Graph, container, conv_attrs, f32, gemm, input_layout, layout, raw_branches,
                         tensor_shapes, weight_bits, weight_type)
from .onnx_qlinear import qlinear_graph


# ---------------------------------------------------------------------------------------------- fp32

def fp32_graph(folded: FoldedNet):
    """The float network of `folded` (BN folded with running statistics, no quantization), as ONNX."""
    arch = folded.arch
    x_shape = [arch.in_channels, arch.input_size, arch.input_size]
    shapes = tensor_shapes(folded, x_shape)
    g = Graph()
    env: dict[str, str] = {}
    for st in folded.steps:
        node = folded.nodes[node_key(st.name)] if node_key(st.name) in folded.nodes else None
        if st.kind == "input":
            env[st.output] = "input"
        elif st.kind == "conv":
            w = g.const(f"{st.name}.weight", f32(node.weight))
            b = g.const(f"{st.name}.bias", f32(node.bias))
            y = g.op("Conv", [env[st.inputs[0]], w, b], st.name, **conv_attrs(node))
            if node.relu and not node.raw:
                y = g.op("Relu", [y], st.name)
            env[st.output] = y
        elif st.kind in ("add", "concat"):
            parts = [g.op("Relu", [env[t]], st.name) if relu else env[t] for t, relu in zip(st.inputs, node.relus)]
            y = g.op("Add", parts, st.name) if st.kind == "add" else g.op("Concat", parts, st.name, axis=1)
            env[st.output] = y
        elif st.kind in ("split", "shuffle"):
            env[st.output] = layout(g, st, env[st.inputs[0]], shapes)
        elif st.kind == "pool":
            p = g.op("GlobalAveragePool", [env[st.inputs[0]]], st.name)
            env[st.output] = g.op("Flatten", [p], st.name, axis=1)
        elif st.kind == "linear":
            w = g.const(f"{st.name}.weight", f32(node.weight))
            b = g.const(f"{st.name}.bias", f32(node.bias))
            g.nodes.append(gemm(g, env[st.inputs[0]], w, b, st.name, "logits"))
    return g.model("fbnas_fp32", x_shape, arch.num_classes)


# ------------------------------------------------------------------------------------------------ qdq

def qdq_graph(integer: IntegerNet, debug_outputs: bool = False, exact_branches: bool = False):
    """The QDQ form of `integer` (see the module docstring). With debug_outputs, every quantized tensor is also
    a graph output; returns (model, {tensor: (output name, zero point, scale)}) (see `debug_codes`)."""
    from onnx import TensorProto

    arch = integer.arch
    x_shape = [arch.in_channels, arch.input_size, arch.input_size]
    shapes = tensor_shapes(integer, x_shape)
    g = Graph()
    env: dict[str, str] = {}  # tensor -> float name (dequantized value, or a raw conv's real output)
    extra: list = []
    debug_names: dict[str, tuple[str, int, Optional[float]]] = {}

    def quantize(t: str, real: str, base: str, flatten: bool = False, layout_input: bool = False) -> str:
        """Q then DQ of a float tensor at tensor t's scale and levels; returns the dequantized name. flatten: the
        pooled (N, C, 1, 1) codes are flattened before the DQ, so that onnxruntime sees DQ -> Gemm and fuses the
        classifier into an integer QGemm."""
        s = integer.scales[t]
        elem, zp, _ = container(integer.levels[t], four_bit=True)
        sc = g.const(f"{base}.scale", f32(s).reshape(()))
        z = g.const(f"{base}.zero_point", np.array(zp), elem) if elem == TensorProto.UINT4 else \
            g.const(f"{base}.zero_point", np.array(zp, np.uint8))
        q = g.op("QuantizeLinear", [real, sc, z], f"{base}.q")
        if flatten:
            q = g.op("Flatten", [q], base, axis=1)
        if layout_input:  # an aligned net's input codes (quant.align)
            q = input_layout(g, integer, q, z)
        dq = g.op("DequantizeLinear", [q, sc, z], f"{base}.dq")
        if debug_outputs:  # the dequantized values (uint4 codes have no numpy type); codes = dq / scale
            extra.append((dq, TensorProto.FLOAT, shapes[t] + ((1, 1) if len(shapes[t]) == 1 and not flatten else ())))
            debug_names[t] = (dq, 0, float(f32(s)))
        return dq

    def quantize_branch(t: str, real: str, base: str) -> str:
        """A raw accumulator requantized on its own to the scale of the add/concat that consumes it (uint8, zero
        point 0 when a ReLU is pending, so that saturation is the ReLU, else 128), dequantized."""
        merge, relu = branches[t]
        sc = g.const(f"{base}.scale", f32(integer.scales[merge]).reshape(()))
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
            w_dq, b_dq = _dequantized_params(g, integer, st, node)
            x = env[st.inputs[0]]
            if st.kind == "linear":
                g.nodes.append(gemm(g, x, w_dq, b_dq, st.name, "logits"))
                continue
            y = g.op("Conv", [x, w_dq, b_dq], st.name, **conv_attrs(node))
            # a ReLU is the quantizer's saturation at zero point 0 (levels [0, hi])
            env[st.output] = quantize_branch(st.output, y, st.name) if node.raw else quantize(st.output, y, st.name)
        elif st.kind in ("add", "concat"):
            parts = [env[t] for t in st.inputs]
            y = g.op("Add", parts, st.name) if st.kind == "add" else g.op("Concat", parts, st.name, axis=1)
            env[st.output] = quantize(st.output, y, st.name)
        elif st.kind in ("split", "shuffle"):
            env[st.output] = layout(g, st, env[st.inputs[0]], shapes)
        elif st.kind == "pool":
            p = g.op("GlobalAveragePool", [env[st.inputs[0]]], st.name)
            env[st.output] = quantize(st.output, p, st.name, flatten=True)
    model = g.model("fbnas_qdq", x_shape, arch.num_classes, extra if debug_outputs else None)
    return (model, debug_names) if debug_outputs else model


def _dequantized_params(g: Graph, integer: IntegerNet, st, node) -> tuple[str, str]:
    """The DequantizeLinear outputs of a conv's or linear's weights (int8, or int4 for <= 4 bits, per output
    channel at S_acc / S_in) and bias (int32 at S_acc)."""
    from onnx import TensorProto

    s_acc = integer.acc_scales[st.name]
    s_w = (s_acc / integer.scales[st.inputs[0]].double()).reshape(-1)
    wq = node.weight.cpu().numpy()
    wt = weight_type(weight_bits(node.weight))
    int8 = wt == TensorProto.INT8
    w_q = g.const(f"{st.name}.weight_q", wq, wt)
    w_scale = g.const(f"{st.name}.weight_scale", f32(s_w))
    w_zp = g.const(f"{st.name}.weight_zp", np.zeros(wq.shape[0], np.int8 if int8 else np.int64), None if int8 else wt)
    w_dq = g.op("DequantizeLinear", [w_q, w_scale, w_zp], f"{st.name}.weight", axis=0)
    b_dq = g.op("DequantizeLinear", [g.const(f"{st.name}.bias_q", node.bias.cpu().numpy().astype(np.int32)),
                                     g.const(f"{st.name}.bias_scale", f32(s_acc.reshape(-1))),
                                     g.const(f"{st.name}.bias_zp", np.zeros(wq.shape[0], np.int32))],
                f"{st.name}.bias", axis=0)
    return w_dq, b_dq


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

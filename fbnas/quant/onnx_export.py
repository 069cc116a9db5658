"""External check of the integer-only model with onnxruntime.

Every integer conv and the classifier are exported as ONNX `ConvInteger` / `MatMulInteger` nodes (uint8 input
for unsigned 8-bit activations, int8 otherwise; int8 weights; int32 output), run in onnxruntime, and the
network is then run with onnxruntime's int32 accumulators in place of ours and our own int64 dyadic
requantization. Checks: each accumulator bit-exact, and the chained logits identical.

Not done yet: a whole-model QDQ / QLinearConv export (8-bit; int4 Q/DQ at opset 21) and its speed benchmark.
"""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..errors import ConfigError
from .integer import IntConv, IntegerNet, IntLinear

ONNX_IR_VERSION = 10  # onnxruntime 1.17+ reads IR 10; newer onnx writes 11 by default


def _session(node_type: str, x_dtype: np.dtype, x_shape, w: np.ndarray, attrs: dict, opset: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x_type = TensorProto.UINT8 if x_dtype == np.uint8 else TensorProto.INT8
    node = helper.make_node(node_type, ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], node_type.lower(), [helper.make_tensor_value_info("x", x_type, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ONNX_IR_VERSION
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


class _OrtAccumulator(nn.Module):
    """Wraps an IntConv/IntLinear: the accumulator comes from onnxruntime, everything else is unchanged."""

    def __init__(self, node: IntConv, opset: int):
        super().__init__()
        self.node = node
        self.opset = opset
        self.sessions: dict = {}
        self.checked = 0
        self.mismatches = 0

    def _ort_acc(self, q: torch.Tensor) -> torch.Tensor:
        unsigned = self.node.offset > 0
        x = q.cpu().numpy().astype(np.uint8 if unsigned else np.int8)
        w = self.node.weight.cpu().numpy().astype(np.int8)
        key = tuple(x.shape)
        if key not in self.sessions:
            if isinstance(self.node, IntLinear):
                self.sessions[key] = _session("MatMulInteger", x.dtype, x.shape, np.ascontiguousarray(w.T), {},
                                              self.opset)
            else:
                ph, pw = self.node.padding
                self.sessions[key] = _session("ConvInteger", x.dtype, x.shape, w,
                                              {"pads": [ph, pw, ph, pw], "strides": list(self.node.stride),
                                               "group": self.node.groups}, self.opset)
        acc = torch.from_numpy(self.sessions[key].run(None, {"x": x})[0]).to(q.device)
        bias = self.node.bias if isinstance(self.node, IntLinear) else self.node.bias.view(1, -1, 1, 1)
        return acc + bias

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        ours = self.node.accumulate(q)
        theirs = self._ort_acc(q)
        self.checked += ours.numel()
        self.mismatches += int((ours.to(torch.int64) != theirs.to(torch.int64)).sum())
        orig = self.node.accumulate
        self.node.accumulate = lambda _q: theirs  # downstream uses onnxruntime's accumulator
        try:
            return self.node(q)
        finally:
            self.node.accumulate = orig


@torch.no_grad()
def check_with_onnxruntime(integer: IntegerNet, x: torch.Tensor, opset: int = 21) -> dict:
    """Run `integer` with onnxruntime's ConvInteger/MatMulInteger accumulators; compare with our own run."""
    ours = integer(x)
    chained = copy.deepcopy(integer).cpu()
    wrappers = {}
    for key, node in list(chained.nodes.items()):
        if isinstance(node, IntConv):
            wrappers[key] = _OrtAccumulator(node, opset)
            chained.nodes[key] = wrappers[key]
    theirs = chained(x.cpu())
    per_node = {k.replace("/", "."): {"elements": w.checked, "mismatches": w.mismatches} for k, w in wrappers.items()}
    return {"accumulators": per_node,
            "accumulator_mismatches": sum(v["mismatches"] for v in per_node.values()),
            "accumulator_elements": sum(v["elements"] for v in per_node.values()),
            "logits_identical": bool(torch.equal(ours.cpu(), theirs)),
            "top1_agreement": float((ours.cpu().argmax(1) == theirs.argmax(1)).float().mean())}


def onnx_command(cfg, weights, arch, test_images) -> None:
    """`fbnas quantize onnx`: the onnxruntime accumulator check on `samples` test images."""
    from .artifacts import load_folded
    from .integer import to_integer

    folded = load_folded(weights, arch, cfg.arch)
    folded.set_rounding(cfg.rounding)
    integer = to_integer(folded)
    res = check_with_onnxruntime(integer, test_images(cfg, cfg.samples), cfg.opset)
    print(f"onnxruntime ConvInteger/MatMulInteger accumulators: {res['accumulator_mismatches']} mismatches in "
          f"{res['accumulator_elements']} elements over {len(res['accumulators'])} nodes; logits identical: "
          f"{res['logits_identical']}; top-1 agreement {100 * res['top1_agreement']:.2f}%")
    if res["accumulator_mismatches"] or not res["logits_identical"]:
        raise SystemExit(1)

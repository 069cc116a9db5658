"""External checks of the integer-only model with onnxruntime (`fbnas quantize onnx mode=...`).

accumulators  every integer conv and the classifier run as single ONNX `ConvInteger` / `MatMulInteger` nodes
              (uint8 input for unsigned 8-bit activations, int8 otherwise; int8 weights; int32 output); the
              network is then run with onnxruntime's int32 accumulators in place of ours and our own int64 dyadic
              requantization. Pass: every accumulator bit-exact and the chained logits identical.
qlinear/qdq   the whole-model graph of `onnx_graph` runs end to end in onnxruntime (all optimisations), every
              program tensor is compared with the integer model's. Pass: the top-1 predictions agree on >= 99.9%
              of the images, and (qlinear) the QLinearConv outputs differ on at most 1e-4 of their elements end
              to end, and each QLinearConv run alone on the integer model's input codes (first batch) is within
              1 LSB on at most 1e-4 of its elements (end to end, a 1-LSB difference upstream can grow
              downstream, so the end-to-end maximum is reported, not bounded). The qdq graph computes its un-fused parts (input quantizer, int16 branch
              requantization, 4-bit layers) in float32, so its LSB statistics are reported, not bounded.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn as nn

from ..errors import CHECK_FAILED_EXIT, ConfigError
from .fold import node_key
from .integer import IntConv, IntegerNet, IntLinear
from .onnx_build import ONNX_IR_VERSION, conv_attrs
from .onnx_graph import debug_codes, ort_session, qdq_graph, qlinear_graph

CHECK_MODES = ("qlinear", "qdq", "accumulators")
MAX_MISMATCH_FRACTION = 1e-4
MAX_LSB = 1
MIN_TOP1_AGREEMENT = 0.999


def _session(node_type: str, x_dtype: np.dtype, x_shape, w: np.ndarray, attrs: dict, opset: int):
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
                self.sessions[key] = _session("ConvInteger", x.dtype, x.shape, w, conv_attrs(self.node), self.opset)
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


@torch.no_grad()
def check_graph(integer: IntegerNet, x: torch.Tensor, mode: str = "qlinear", batch_size: int = 250,
                threads: int = 1, exact_branches: bool = False, lsb_samples: int = 0) -> dict:
    """Run the whole-model `mode` graph (qlinear | qdq) of `integer` in onnxruntime over x (in batches): the
    logits' top-1 agreement over all of x, and every tensor compared with the integer model's, end to end, over
    the first `lsb_samples` images (0 = all). Returns per-tensor counts, the totals over the quantized conv
    outputs, the top-1 agreement and `passed`."""
    if mode == "qlinear":
        model, debug, _ = qlinear_graph(integer, debug_outputs=True, exact_branches=exact_branches)
    elif mode == "qdq":
        model, debug = qdq_graph(integer, debug_outputs=True, exact_branches=exact_branches)
    else:
        raise ConfigError(f"field 'mode' is {mode!r}; choose one of {', '.join(CHECK_MODES)}")
    sess = ort_session(model, threads=threads)
    lean = ort_session(qlinear_graph(integer, exact_branches=exact_branches) if mode == "qlinear"
                       else qdq_graph(integer, exact_branches=exact_branches), threads=threads)
    names = [o.name for o in sess.get_outputs()]
    conv_tensors = {st.output for st in integer.steps
                    if st.kind == "conv" and not integer.nodes[node_key(st.name)].raw}
    stats = {t: {"elements": 0, "mismatches": 0, "max_abs_diff": 0} for t in debug}
    agree = n = n_lsb = 0
    lsb_limit = len(x) if lsb_samples <= 0 else min(lsb_samples, len(x))
    integer.eval()
    dev = next(integer.buffers()).device  # our model runs where it lives (CUDA is bit-identical to CPU)
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].cpu()
        feed = {"input": xb.numpy().astype(np.float32)}
        if start >= lsb_limit:  # top-1 only
            ours = integer(xb.to(dev)).cpu()
            agree += int((torch.from_numpy(lean.run(None, feed)[0]).argmax(1) == ours.argmax(1)).sum())
            n += len(xb)
            continue
        rec: dict = {}
        ours = integer(xb.to(dev), record=rec).cpu()
        rec = {k: v.cpu() for k, v in rec.items()}
        res = dict(zip(names, sess.run(None, feed)))
        agree += int((torch.from_numpy(res["logits"]).argmax(1) == ours.argmax(1)).sum())
        n += len(xb)
        n_lsb += len(xb)
        for t, (name, zp, scale) in debug.items():
            mine = rec[t].numpy().astype(np.int64)
            diff = np.abs(debug_codes(res[name], zp, scale).reshape(mine.shape) - mine)
            st = stats[t]
            st["elements"] += diff.size
            st["mismatches"] += int((diff > 0).sum())
            st["max_abs_diff"] = max(st["max_abs_diff"], int(diff.max()) if diff.size else 0)
    conv_el = sum(stats[t]["elements"] for t in conv_tensors)
    conv_bad = sum(stats[t]["mismatches"] for t in conv_tensors)
    conv_max = max((stats[t]["max_abs_diff"] for t in conv_tensors), default=0)
    frac = conv_bad / max(conv_el, 1)
    top1 = agree / max(n, 1)
    out = {"mode": mode, "exact_branches": exact_branches, "images": n, "lsb_images": n_lsb, "tensors": stats, "conv_elements": conv_el,
           "conv_mismatches": conv_bad, "conv_mismatch_fraction": frac, "conv_max_abs_diff": conv_max,
           "top1_agreement": top1, "top1_disagreements": n - agree,
           "top1_allowed": allowed_disagreements(n)}
    # The verdict uses what holds per element and per image whatever the sample: each kernel alone within 1 LSB
    # at a rare-tie rate, and top-1. End-to-end counts are reported only: one LSB at a near-tie propagates
    # through the following layers (more at 2-4 bits), so their rate depends on which images were drawn.
    within = True
    if mode == "qlinear":
        iso = isolated_conv_check(integer, model, debug, x[:batch_size], conv_tensors)
        out["isolated"] = iso
        within = iso["max_abs_diff"] <= MAX_LSB and iso["mismatch_fraction"] <= MAX_MISMATCH_FRACTION
    out["within_lsb_bounds"] = within
    out["passed"] = n - agree <= out["top1_allowed"] and within
    return out


def allowed_disagreements(n: int) -> int:
    """Top-1 disagreements a check of n images tolerates: the 0.1% rate, and at least one (a single near-tie
    in a small sample says nothing about the rate)."""
    return max(1, math.floor((1 - MIN_TOP1_AGREEMENT) * n + 1e-9))


@torch.no_grad()
def isolated_conv_check(integer: IntegerNet, model, debug: dict, x: torch.Tensor, conv_tensors: set) -> dict:
    """Each QLinearConv (with its level Clip) alone, fed the integer model's own input codes: the kernel's
    requantization against ours, without upstream differences propagating."""
    import onnx.utils

    integer.eval()
    dev = next(integer.buffers()).device
    rec: dict = {}
    integer(x.to(dev), record=rec)
    extractor = onnx.utils.Extractor(model)
    total = bad = worst = 0
    for st in integer.steps:
        if st.output not in conv_tensors:
            continue
        (in_name, zp_in, _), (out_name, zp_out, _) = debug[st.inputs[0]], debug[st.output]
        sub = extractor.extract_model([in_name], [out_name])
        sess = ort_session(sub)
        codes = (rec[st.inputs[0]].cpu().to(torch.int64) + zp_in).numpy().astype(np.uint8)
        theirs = sess.run(None, {in_name: codes})[0].astype(np.int64) - zp_out
        diff = np.abs(theirs - rec[st.output].cpu().numpy().astype(np.int64))
        total += diff.size
        bad += int((diff > 0).sum())
        worst = max(worst, int(diff.max()))
    return {"elements": total, "mismatches": bad, "mismatch_fraction": bad / max(total, 1), "max_abs_diff": worst}


def format_graph_check(res: dict) -> str:
    kind = "QLinearConv" if res["mode"] == "qlinear" else "quantized conv"
    iso = res.get("isolated")
    alone = (f"; each QLinearConv alone on our inputs: {iso['mismatches']} of {iso['elements']} elements differ "
             f"({iso['mismatch_fraction']:.2e}; bound {MAX_MISMATCH_FRACTION:g}), max {iso['max_abs_diff']} LSB (bound {MAX_LSB})"
             ) if iso else ""
    return (f"onnxruntime {res['mode']}{' (exact branches)' if res['exact_branches'] else ''} graph "
            f"(tensors compared on {res['lsb_images']} images) on {res['images']} images: {kind} outputs differ on "
            f"{res['conv_mismatches']} of {res['conv_elements']} elements end to end ({res['conv_mismatch_fraction']:.2e}; "
            f"max {res['conv_max_abs_diff']} LSB; reported, not bounded: differences propagate){alone}; "
            f"top-1 agreement {100 * res['top1_agreement']:.3f}%, {res['top1_disagreements']} disagreements "
            f"(bound {res['top1_allowed']}: {100 * (1 - MIN_TOP1_AGREEMENT):.1f}% of the images, at least 1"
            f"{'' if res['mode'] == 'qlinear' else '; LSB bounds not applied to qdq'}): "
            f"{'PASS' if res['passed'] else 'FAIL'}")


def onnx_command(cfg, weights, arch, test_images) -> None:
    """`fbnas quantize onnx mode=qlinear|qdq|accumulators`: the onnxruntime checks on `samples` test images
    (0 = the whole test set), of the channel-aligned graph unless align=false; `out=<file>.onnx` also writes the
    checked graph (qlinear or qdq)."""
    from .artifacts import load_folded
    from .integer import to_integer
    from .onnx_graph import export_graph, save_onnx

    if cfg.mode not in CHECK_MODES:
        raise ConfigError(f"field 'mode' is {cfg.mode!r}; choose one of {', '.join(CHECK_MODES)}")
    folded = load_folded(weights, arch, cfg.arch)
    folded.set_rounding(cfg.rounding)
    integer = to_integer(folded)
    if cfg.align:  # the layout `fbnas export` ships; logits are bit-identical to the plain net's
        from .align import align_channels

        integer, added = align_channels(integer)
        print(f"checking the channel-aligned graph (as `fbnas export` writes it): {added or 'nothing to align'}")
    x = test_images(cfg, cfg.samples)
    if cfg.mode == "accumulators":
        res = check_with_onnxruntime(integer, x, cfg.opset)
        print(f"onnxruntime ConvInteger/MatMulInteger accumulators: {res['accumulator_mismatches']} mismatches in "
              f"{res['accumulator_elements']} elements over {len(res['accumulators'])} nodes; logits identical: "
              f"{res['logits_identical']}; top-1 agreement {100 * res['top1_agreement']:.2f}%")
        failed = bool(res["accumulator_mismatches"]) or not res["logits_identical"]
    else:
        if cfg.out:
            save_onnx(export_graph(cfg.mode, integer=integer, exact_branches=cfg.exact_branches), cfg.out)
            print(f"wrote {cfg.out}")
        res = check_graph(integer, x, cfg.mode, exact_branches=cfg.exact_branches, lsb_samples=cfg.lsb_samples)
        print(format_graph_check(res))
        failed = not res["passed"]
    if failed:
        raise SystemExit(CHECK_FAILED_EXIT)

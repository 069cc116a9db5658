"""onnxruntime checks: ConvInteger/MatMulInteger accumulators bit-exact; the whole-model qlinear graph within
1 LSB on <= 1e-4 of QLinearConv outputs; the qdq graph (int4 Q/DQ at opset 21) agreeing in top-1; the fp32
graph equal to the float network; onnxruntime really fuses the 8-bit QDQ graph into integer kernels."""
import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime")

from fbnas.quant.integer import to_integer  # noqa: E402
from fbnas.quant.onnx_check import allowed_disagreements, check_graph, check_with_onnxruntime  # noqa: E402
from fbnas.quant.onnx_graph import fp32_graph, ort_session, qdq_graph, qlinear_graph  # noqa: E402
from fbnas.train import set_quantization  # noqa: E402

from test_integer import _folded  # noqa: E402

MIXED = ([8, 4, 2, 8, 4, 8], [8, 4, 8, 4, 8, 4])


@pytest.fixture(scope="module", params=["w8a8", "mixed"])
def models(request):
    bits = (8, 8) if request.param == "w8a8" else MIXED
    net, folded, x = _folded(*bits, seed=1, n=8)
    return request.param, net, folded, to_integer(folded), x


def test_onnxruntime_accumulators_are_bit_exact(models):
    _, _, _, integer, x = models
    res = check_with_onnxruntime(integer, x)
    assert res["accumulator_elements"] > 0
    assert res["accumulator_mismatches"] == 0
    assert res["logits_identical"]


def test_qlinear_graph_within_one_lsb(models):
    _, _, _, integer, x = models
    res = check_graph(integer, x, "qlinear", batch_size=4, exact_branches=True)
    assert res["conv_elements"] > 100_000
    assert res["conv_max_abs_diff"] <= 1 and res["conv_mismatch_fraction"] <= 1e-4
    assert res["isolated"]["elements"] > 10_000 and res["isolated"]["max_abs_diff"] <= 1
    assert res["top1_agreement"] == 1.0 and res["passed"]
    ops = {n.op_type for n in qlinear_graph(integer, exact_branches=True).graph.node}
    assert {"QLinearConv", "ConvInteger", "MatMulInteger"} <= ops and "Conv" not in ops


def test_fast_qlinear_graph_uses_integer_kernels_and_agrees(models):
    name, _, _, integer, x = models
    res = check_graph(integer, x, "qlinear", batch_size=4)
    assert res["top1_agreement"] == 1.0
    if name == "w8a8":  # random BN gains of the mixed model push a residual branch past 8-bit range (saturation)
        assert res["conv_max_abs_diff"] <= 1 and res["conv_mismatch_fraction"] <= 1e-4
    ops = {n.op_type for n in qlinear_graph(integer).graph.node}
    assert {"QLinearConv", "QLinearAdd", "QLinearConcat", "MatMulInteger"} <= ops
    assert not ops & {"Conv", "ConvInteger"}


def test_qdq_graph_agrees_and_uses_int4_for_low_bits(models):
    name, _, _, integer, x = models
    res = check_graph(integer, x, "qdq", batch_size=4)
    assert res["top1_agreement"] == 1.0 and res["passed"]
    assert res["conv_mismatch_fraction"] < 1e-3  # float32 input quantizer and convs: rare LSB drifts
    model = qdq_graph(integer)
    onnx.checker.check_model(model)
    assert model.ir_version == 10 and model.opset_import[0].version == 21
    types = {i.data_type for i in model.graph.initializer}
    assert (onnx.TensorProto.INT4 in types) == (name == "mixed")  # 2/4-bit weights as int4
    assert (onnx.TensorProto.UINT4 in types) == (name == "mixed")  # 4-bit activations as uint4


def test_onnxruntime_fuses_8bit_qdq_into_integer_kernels(models, tmp_path):
    name, _, _, integer, _ = models
    if name != "w8a8":
        pytest.skip("the 4-bit graph runs its Q/DQ as written")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(qdq_graph(integer).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("QLinearConv") >= 10, ops
    # the classifier too: the pooled codes are flattened before their DQ, so DQ -> Gemm fuses into QGemm and no
    # float Gemm or DequantizeLinear of a constant is left to run per inference
    assert "QGemm" in ops and "Gemm" not in ops and "DequantizeLinear" not in ops, ops


def test_fp32_graph_equals_float_network(models):
    _, net, folded, _, x = models
    set_quantization(net, False)
    try:
        with torch.no_grad():
            ref = net.eval()(x).numpy()
    finally:
        set_quantization(net, True)
    got = ort_session(fp32_graph(folded)).run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_verdict_does_not_depend_on_the_sample(models):
    _, _, _, integer, x = models
    verdicts = {(n, lsb): check_graph(integer, x[:n], "qlinear", batch_size=4, lsb_samples=lsb)["passed"]
                for n, lsb in ((2, 0), (8, 0), (8, 2))}
    assert set(verdicts.values()) == {True}, verdicts  # end-to-end LSB counts are reported, not bounded


def test_allowed_top1_disagreements():
    assert [allowed_disagreements(n) for n in (1, 256, 999, 1000, 10000)] == [1, 1, 1, 1, 10]

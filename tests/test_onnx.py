"""onnxruntime's ConvInteger/MatMulInteger accumulators equal the integer model's, bit for bit."""
import pytest

pytest.importorskip("onnxruntime")

from fbnas.quant.integer import to_integer  # noqa: E402
from fbnas.quant.onnx_export import check_with_onnxruntime  # noqa: E402

from test_integer import _folded  # noqa: E402


@pytest.mark.parametrize("bits", [(8, 8), ([8, 4, 2, 8, 4, 8], [8, 4, 8, 4, 8, 4])])
def test_onnxruntime_accumulators_are_bit_exact(bits):
    _, folded, x = _folded(*bits, n=8)
    res = check_with_onnxruntime(to_integer(folded), x)
    assert res["accumulator_elements"] > 0
    assert res["accumulator_mismatches"] == 0
    assert res["logits_identical"]

"""Channel alignment for onnxruntime's int8 kernels (fbnas.quant.align): exact (bit-identical logits and
unpadded tensors), padded where it should be, and the aligned ONNX graphs agree with the integer model."""
import numpy as np
import pytest
import torch

from fbnas.quant.align import align_channels
from fbnas.quant.fold import node_key
from fbnas.quant.integer import to_integer

from test_integer import _folded
from test_onnx import MIXED


@pytest.fixture(scope="module", params=["w8a8", "mixed"])
def nets(request):
    bits = (8, 8) if request.param == "w8a8" else MIXED
    _, folded, x = _folded(*bits, seed=2, n=8)
    integer = to_integer(folded)
    aligned, added = align_channels(integer)
    return integer, aligned, added, x


def test_alignment_pads_depthwise_chains_and_the_stem_input(nets):
    integer, aligned, added, _ = nets
    assert added.get("input") == 3  # 1 Fashion-MNIST channel -> 4
    assert aligned.nodes["stem"].weight.shape[1] == 4
    assert added, "the fmnist28 child has 12- and 120-channel depthwise convs"
    for name, extra in added.items():
        if name == "input":
            continue
        dw = aligned.nodes[node_key(name)]
        assert dw.groups % 16 == 0 and dw.weight.shape[0] == dw.groups and extra > 0
    # the original net is untouched
    assert integer.nodes["stem"].weight.shape[1] == 1 and integer.input_node.pad_channels == 0


def test_aligned_net_is_bit_identical(nets):
    integer, aligned, added, x = nets
    rec_i, rec_a = {}, {}
    with torch.no_grad():
        li, la = integer(x, record=rec_i), aligned(x, record=rec_a)
    assert torch.equal(li, la)
    for name, qi in rec_i.items():  # every tensor: its original channels equal, the added ones zero
        qa = rec_a[name]
        if qa.dim() == 4 and qa.shape[1] > qi.shape[1]:
            assert torch.equal(qa[:, :qi.shape[1]], qi), name
            assert not qa[:, qi.shape[1]:].any(), name
        else:
            assert torch.equal(qa, qi), name


def test_aligned_onnx_graphs_agree_with_the_integer_model(nets):
    pytest.importorskip("onnxruntime")
    from fbnas.quant.onnx_graph import ort_session, qdq_graph, qlinear_graph

    integer, aligned, _, x = nets
    with torch.no_grad():
        ref = integer(x).numpy()
    for graph in (qlinear_graph(aligned), qdq_graph(aligned)):
        got = ort_session(graph).run(None, {"input": x.numpy()})[0]
        assert got.shape == ref.shape
        assert (got.argmax(1) == ref.argmax(1)).all()
    exact = qlinear_graph(aligned, exact_branches=True)
    got = ort_session(exact).run(None, {"input": x.numpy()})[0]
    plain = ort_session(qlinear_graph(integer, exact_branches=True)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_array_equal(got, plain)  # padding changes nothing the kernels compute

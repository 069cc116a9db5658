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


@pytest.mark.parametrize("c,k,pad,stride,size", [(1, 3, 1, 2, 28), (3, 3, 1, 2, 32), (3, 7, 3, 2, 16), (2, 5, 2, 2, 12),
                                                 (1, 3, 1, 4, 16), (3, 3, 0, 2, 10)])
def test_space_to_depth_first_conv_keeps_every_accumulator(c, k, pad, stride, size):
    from fbnas.quant.align import _space_to_depth_first_conv
    from fbnas.quant.integer import IntConv, int_conv2d, space_to_depth

    torch.manual_seed(k * 10 + c)
    w = torch.randint(-127, 128, (8, c, k, k))
    conv = IntConv("stem", w, torch.zeros(8), (stride, stride), (pad, pad), 1, 0, None, 0, 0, "half_even")
    x = torch.randint(-128, 128, (2, c, size, size))
    ref = int_conv2d(x, conv.weight, conv.stride, conv.padding, 1)
    assert _space_to_depth_first_conv(conv, size) == stride
    assert conv.stride == (1, 1) and conv.weight.shape[1] == c * stride * stride
    assert conv.weight.shape[2] == -(-k // stride) or conv.weight.shape[2] == -(-k // stride) + 1
    got = int_conv2d(space_to_depth(x, stride), conv.weight, conv.stride, conv.padding, 1)
    assert torch.equal(got, ref)
    # the weights are a permutation of the original taps plus zeros
    assert int(conv.weight.abs().sum()) == int(w.abs().sum())


def test_stride2_stem_becomes_a_space_to_depth_conv_end_to_end():
    pytest.importorskip("onnxruntime")
    from fbnas.arch import Arch
    from fbnas.latency.measured_int8 import calibrated_random_network
    from fbnas.quant.onnx_graph import ort_session, qdq_graph, qlinear_graph
    from fbnas.space import load_space

    arch = Arch.from_space(load_space("fmnist"), ["ir_k3_e1", "ir_k3_e3", "shuffle_k3", "sqnxt_k3", "ir_k3_e3",
                                                  "ir_k3_e6"], 8, 8)
    integer = to_integer(calibrated_random_network(arch, calib_batch=8))
    aligned, added = align_channels(integer)
    assert added["space_to_depth"] == 2 and "input" not in added  # 1 channel -> 4 by the rearrangement, no pad
    assert tuple(aligned.nodes["stem"].weight.shape) == (16, 4, 2, 2)
    assert integer.input_node.space_to_depth == 1 and integer.nodes["stem"].stride == (2, 2)  # original untouched
    x = torch.randn(6, 1, 28, 28)
    rec_i, rec_a = {}, {}
    with torch.no_grad():
        li, la = integer(x, record=rec_i), aligned(x, record=rec_a)
    assert torch.equal(li, la) and torch.equal(rec_i["stem"], rec_a["stem"])
    exact = ort_session(qlinear_graph(aligned)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_array_equal(exact, ort_session(qlinear_graph(integer)).run(None, {"input": x.numpy()})[0])
    qdq = ort_session(qdq_graph(aligned)).run(None, {"input": x.numpy()})[0]
    assert (qdq.argmax(1) == li.numpy().argmax(1)).all()

"""The contract every registered op keeps (known_ops(), so a new block is tested without naming it here): the
module's output shape, its parameters and MACs equal its fused-kernel description, it has an integer lowering,
and its integer-only model equals its folded fake-quant model on random input. Layer shapes are the `fmnist`
space's: stride 1 and 2, equal and changing channels, even and odd feature maps (14, 7, 4, 2 px)."""
import pytest
import torch
import torch.nn as nn

from fbnas import Arch, build_model, load_space
from fbnas.blocks import build_op, get_op, known_ops, op_kernels
from fbnas.quant.fold import fold_model
from fbnas.quant.integer import to_integer
from folded_vs_integer import compare, random_bn

SPACE = load_space("fmnist")
W_BITS, A_BITS = [8, 4, 2, 8, 4, 2], [8, 4, 8, 4, 8, 4]


def _conv_macs(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """MACs of every conv the module runs on x (one image), counted from the convs' real outputs, and the output."""
    total = 0

    def hook(conv, _inputs, out):
        nonlocal total
        total += out[0].numel() * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        y = module(x)
    for h in handles:
        h.remove()
    return total, y


@pytest.mark.parametrize("op", known_ops())
def test_module_matches_kernel_description(op):
    for layer in SPACE.layers():
        c_in, c_out, s, h = layer.c_in, layer.c_out, layer.stride, layer.h_in
        m = build_op(op, c_in, c_out, s).eval()
        macs, y = _conv_macs(m, torch.randn(1, c_in, h, h))
        assert y.shape == (1, c_out, layer.h_out, layer.w_out), (op, layer)
        ks = op_kernels(op, c_in, c_out, s, h, h)
        bn = sum(p.numel() for b in m.modules() if isinstance(b, nn.BatchNorm2d) for p in b.parameters())
        params = sum(p.numel() for p in m.parameters())
        assert sum(k.params for k in ks) == params - bn, (op, layer)  # BN folds into the convs
        assert sum(k.macs for k in ks) == macs, (op, layer)


@pytest.mark.parametrize("op", known_ops())
def test_integer_model_equals_folded_model(op):
    assert callable(get_op(op).lower)
    torch.manual_seed(0)
    net = build_model(Arch.from_space(SPACE, [op] * SPACE.num_layers, W_BITS, A_BITS)).eval()
    random_bn(net, 0)
    folded = fold_model(net)
    x = torch.randn(8, 1, SPACE.input_size, SPACE.input_size)
    folded.calibrate([x[:4], x[4:]])
    folded.eval()
    lf, li, mismatches = compare(folded, to_integer(folded), x)
    assert sum(mismatches.values()) == 0, mismatches
    assert torch.equal(lf, li)

import pytest
import timm
import torch

from fbnas import Arch, build_model, load_space
from fbnas.blocks import build_op, get_op, known_ops, op_kernels
from fbnas.errors import ConfigError

# FBNet-C (timm `fbnetc_100`) as a child of the FBNet ImageNet space: 22 layers, one skip in stage 2.
FBNET_C = ["ir_k3_e1", "ir_k3_e6", "skip", "ir_k3_e1", "ir_k3_e1", "ir_k5_e6", "ir_k5_e3", "ir_k5_e6", "ir_k3_e6",
           "ir_k5_e6", "ir_k5_e3", "ir_k5_e6", "ir_k5_e6", "ir_k5_e6", "ir_k5_e6", "ir_k5_e6", "ir_k5_e3",
           "ir_k5_e6", "ir_k5_e6", "ir_k5_e6", "ir_k5_e6", "ir_k3_e6"]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_fbnet_c_child_matches_timm_parameter_count():
    arch = Arch.from_space(load_space("fbnet"), FBNET_C, 8, 8)
    ours = build_model(arch, quantized=False)
    ref = timm.create_model("fbnetc_100", pretrained=False, num_classes=1000)
    assert n_params(ours) == n_params(ref) == 5_572_200
    # the kernel description agrees with the module (BN folded into convs, classifier bias kept)
    bn = sum(p.numel() for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters())
    assert arch.params() == n_params(ours) - bn


def test_fbnet_c_child_output_shape():
    arch = Arch.from_space(load_space("fbnet"), FBNET_C, 8, 8)
    m = build_model(arch, quantized=False).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_reference_block_parameter_counts():
    # MobileNetV2 inverted residual 16->24, e6, k3: 16*96 + 96*9 + 96*24 weights, 3 BNs
    m = build_op("ir_k3_e6", 16, 24, 2)
    assert n_params(m) == 16 * 96 + 96 * 9 + 96 * 24 + 2 * (96 + 96 + 24)
    # torchvision's ShuffleNetV2 stride-1 unit with 116 channels has the same branch as ours
    import torchvision

    tv = torchvision.models.shufflenet_v2_x1_0().stage2[1]
    assert n_params(build_op("shuffle_k3", 116, 116, 1)) == n_params(tv)
    tv2 = torchvision.models.shufflenet_v2_x1_0().stage2[0]  # stride 2, 24 -> 116
    assert n_params(build_op("shuffle_k3", 24, 116, 2)) == n_params(tv2)
    # timm's MnasNet depthwise-separable block (32 -> 16) is our sep_k3
    sep = timm.create_model("mnasnet_100", pretrained=False).blocks[0][0]
    assert n_params(build_op("sep_k3", 32, 16, 1)) == n_params(sep) == 896


def test_ir_macs_match_formula():
    ks = op_kernels("ir_k3_e6", 16, 24, 2, 32, 32)
    macs = sum(k.macs for k in ks)
    assert macs == 32 * 32 * 16 * 96 + 16 * 16 * 96 * 9 + 16 * 16 * 96 * 24


def test_grouped_ir_has_shuffle_and_half_the_pointwise_weights():
    dense = build_op("ir_k3_e1", 32, 32, 1)
    grouped = build_op("ir_k3_e1_g2", 32, 32, 1)
    assert isinstance(grouped.shuffle, torch.nn.ChannelShuffle)
    assert grouped.pw.conv.weight.numel() * 2 == dense.pw.conv.weight.numel()


def test_skip_is_identity_or_conv():
    assert isinstance(build_op("skip", 16, 16, 1), torch.nn.Identity)
    assert op_kernels("skip", 16, 16, 1, 8, 8) == []
    m = build_op("skip", 16, 24, 2)
    assert m(torch.randn(1, 16, 8, 8)).shape == (1, 24, 4, 4)


def test_unknown_op():
    with pytest.raises(ConfigError, match="unknown op 'ir_k9_e9'"):
        get_op("ir_k9_e9")
    assert "sqnxt_k3" in known_ops() and "shuffle_k5" in known_ops()

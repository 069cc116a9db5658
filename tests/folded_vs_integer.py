"""Shared by the integer-model tests: random BatchNorm statistics, and a tensor-by-tensor comparison of the
folded fake-quant model with the integer-only model."""
import torch
import torch.nn as nn


def random_bn(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)


def compare(folded, integer, x):
    rec_f, rec_i = {}, {}
    with torch.no_grad():
        lf, li = folded(x, record=rec_f), integer(x, record=rec_i)
    mismatches = {}
    for name, qi in rec_i.items():
        if name == "head.classifier":
            continue
        qf = rec_f[name][0]
        assert float((qf - qf.round()).abs().max()) == 0.0, f"{name}: fake tensor is not integer-valued"
        mismatches[name] = int((qf.to(torch.int64) != qi.to(torch.int64)).sum())
    return lf, li, mismatches

"""Public reference networks as fused-kernel lists, for fitting and checking device models against published
whole-model latencies (fbnas/latency/data/whole_model_latency.csv).

MobileNet-v1 is written out here (torchvision has none); every other network is traced from its torchvision
definition at the measured input size: the aten operations of one forward pass on the meta device (no weights,
no compute) become KernelSpecs (convolutions, matrix products, residual adds and SE scales, concatenations,
pooling). BatchNorm and activations are fused into the convolution before them, as mobile runtimes do, except
SiLU (swish), which runtimes run as elementwise passes of their own (ncnn's Swish layer, TFLite's LOGISTIC and
MUL): an `act` kernel.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

from ..blocks import KernelSpec
from ..blocks.kernels import conv
from ..errors import ConfigError
from ..space import conv_out_size

# (C_out, stride) of MobileNet-v1's depthwise-separable layers after the 3x3/2 stem with 32 channels
_V1_LAYERS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
              (512, 1), (1024, 2), (1024, 1))


def _classifier(c: int, size: int, classes: int) -> list[KernelSpec]:
    return [KernelSpec("pool", c, c, size, size, quantized=False), KernelSpec("linear", c, classes, 1, 1)]


def mobilenet_v1_kernels(size: int = 224, classes: int = 1000) -> list[KernelSpec]:
    ks = [conv("conv", 3, 32, size, size, 3, 2)]
    c, h = 32, conv_out_size(size, 2)
    for c_out, s in _V1_LAYERS:
        ks.append(conv("dw", c, c, h, h, 3, s, c))
        h = conv_out_size(h, s)
        ks.append(conv("pw", c, c_out, h, h))
        c = c_out
    return ks + _classifier(c, h, classes)


# ---------------------------------------------------------------------------------------------- tracing

def trace_kernels(module, size: int = 224, in_channels: int = 3) -> list[KernelSpec]:
    """The fused kernels of one forward pass of `module` (an nn.Module on the meta device, or movable there)
    on a 1 x in_channels x size x size input."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    kernels: list[KernelSpec] = []

    def shape4(t) -> tuple[int, int, int, int]:
        return tuple(t.shape) if t.dim() == 4 else (1, t.shape[-1], 1, 1)

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            op = func.overloadpacket
            if op is aten.convolution:
                x, w, stride, groups = args[0], args[1], args[3], args[8]
                _, c, h, wd = x.shape
                c_out, c_per_group, kh, kw = w.shape
                kind = "dw" if groups > 1 and c_per_group == 1 else ("pw" if kh == kw == 1 else "conv")
                kernels.append(KernelSpec(kind, c, c_out, h, wd, kh, kw, stride[0], groups, act=True))
            elif op in (aten.addmm, aten.mm):
                w = args[2] if op is aten.addmm else args[1]
                kernels.append(KernelSpec("linear", w.shape[0], w.shape[1], 1, 1))
            elif op in (aten.add, aten.add_, aten.mul, aten.mul_) and isinstance(args[1], torch.Tensor) \
                    and args[0].dim() == 4:
                _, c, h, wd = shape4(out)
                kernels.append(KernelSpec("add", c, c, h, wd, quantized=False))
            elif op in (aten.silu, aten.silu_) and out.dim() == 4:
                _, c, h, wd = out.shape
                kernels.append(KernelSpec("act", c, c, h, wd, quantized=False))
            elif op is aten.cat and args[0][0].dim() == 4:
                _, c, h, wd = shape4(out)
                kernels.append(KernelSpec("concat", c, c, h, wd, quantized=False))
            elif op in (aten.max_pool2d_with_indices, aten.max_pool2d, aten.avg_pool2d):
                _, c, h, wd = args[0].shape
                stride = args[2] if len(args) > 2 and args[2] else args[1]
                kernels.append(KernelSpec("concat", c, c, h, wd, stride=int(stride[0]), quantized=False))
            elif op in (aten.mean, aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d) and args[0].dim() == 4:
                _, c, h, wd = args[0].shape
                kernels.append(KernelSpec("pool", c, c, h, wd, quantized=False))
            return out

    module = module.to("meta").eval()
    with Recorder(), torch.no_grad():
        module(torch.empty(1, in_channels, size, size, device="meta"))
    return kernels


_TORCHVISION_KWARGS = {"googlenet": {"init_weights": False, "aux_logits": False}}


def torchvision_kernels(name: str, size: int = 224) -> list[KernelSpec]:
    import torch
    import torchvision

    build = getattr(torchvision.models, name)
    kwargs = {"weights": None, **_TORCHVISION_KWARGS.get(name, {})}
    try:
        with torch.device("meta"):
            model = build(**kwargs)
    except (NotImplementedError, RuntimeError):  # builders that compute on tensors (RegNet's widths)
        model = build(**kwargs)
    return trace_kernels(model, size)


# ---------------------------------------------------------------------------------------------- Once-for-All

OFA_NETS_JSON = Path(__file__).resolve().parent / "data" / "ofa_pixel2_nets.json"


@lru_cache(maxsize=None)
def ofa_nets() -> dict[str, dict]:
    with open(OFA_NETS_JSON) as f:
        return {n["name"]: n for n in json.load(f)["nets"]}


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def ofa_kernels(name: str, size: Optional[int] = None) -> list[KernelSpec]:
    """A Once-for-All MobileNetV3-space network (3x3/2 stem, inverted residual blocks with optional
    squeeze-excite, 1x1 expand, pool, 1x1 feature mix, classifier) at its own input size."""
    net = ofa_nets()[name]
    h = size or net["image_size"]
    ks = [conv("conv", 3, net["first_conv"], h, h, 3, 2)]
    h = conv_out_size(h, 2)
    for k, stride, c_in, c_out, mid, se, residual in net["blocks"]:
        if mid != c_in:
            ks.append(conv("pw", c_in, mid, h, h))
        ks.append(conv("dw", mid, mid, h, h, k, stride, mid))
        h = conv_out_size(h, stride)
        if se:
            squeeze = _make_divisible(mid // 4)
            ks += [KernelSpec("pool", mid, mid, h, h, quantized=False), conv("pw", mid, squeeze, 1, 1),
                   conv("pw", squeeze, mid, 1, 1), KernelSpec("add", mid, mid, h, h, quantized=False)]
        ks.append(conv("pw", mid, c_out, h, h, act=False))
        if residual:
            ks.append(KernelSpec("add", c_out, c_out, h, h, quantized=False))
    c = net["blocks"][-1][3]
    ks.append(conv("pw", c, net["final_expand"], h, h))
    ks += [KernelSpec("pool", net["final_expand"], net["final_expand"], h, h, quantized=False),
           conv("pw", net["final_expand"], net["feature_mix"], 1, 1),
           KernelSpec("linear", net["feature_mix"], net["classes"], 1, 1)]
    return ks


# name -> kernels at an input size; the names used in whole_model_latency.csv
_HAND_WRITTEN: dict[str, Callable[[int], list[KernelSpec]]] = {"mobilenet_v1": mobilenet_v1_kernels}
TORCHVISION_NETS = ("squeezenet1_1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
                    "shufflenet_v2_x1_0", "mnasnet1_0", "efficientnet_b0", "regnet_y_400mf", "googlenet",
                    "resnet18", "alexnet", "vgg16", "resnet50")


def reference_net_names() -> list[str]:
    return sorted([*_HAND_WRITTEN, *TORCHVISION_NETS, *ofa_nets()])


@lru_cache(maxsize=None)
def _kernels_cached(name: str, size: int) -> tuple[KernelSpec, ...]:
    if name in _HAND_WRITTEN:
        return tuple(_HAND_WRITTEN[name](size))
    if name in TORCHVISION_NETS:
        return tuple(torchvision_kernels(name, size))
    if name in ofa_nets():
        return tuple(ofa_kernels(name, size))
    raise ConfigError(f"unknown reference network {name!r}; known: {', '.join(reference_net_names())}")


def reference_kernels(name: str, size: int = 224) -> list[KernelSpec]:
    return list(_kernels_cached(name, size))


"""Public reference networks as fused-kernel lists, for calibrating device models against published
whole-model latencies (shared/latency_anchors/model_anchors.csv): MobileNet-v1 1.0 and MobileNet-v2 1.0 at
224 px, 1000 classes."""
from __future__ import annotations

from ..blocks import KernelSpec
from ..blocks.kernels import conv
from ..blocks.mobilenet import ir_kernels
from ..space import conv_out_size

# (C_out, stride) of MobileNet-v1's depthwise-separable layers after the 3x3/2 stem with 32 channels
_V1_LAYERS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
              (512, 1), (1024, 2), (1024, 1))
# (expansion, C_out, repeats, first stride) of MobileNet-v2
_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))


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


def mobilenet_v2_kernels(size: int = 224, classes: int = 1000) -> list[KernelSpec]:
    ks = [conv("conv", 3, 32, size, size, 3, 2)]
    c, h = 32, conv_out_size(size, 2)
    for e, c_out, n, first_stride in _V2_STAGES:
        for r in range(n):
            s = first_stride if r == 0 else 1
            if e == 1:  # MobileNet-v2's t=1 block has no expansion 1x1 (FBNet's ir_*_e1 keeps one)
                ks += [conv("dw", c, c, h, h, 3, s, c), conv("pw", c, c_out, conv_out_size(h, s),
                                                             conv_out_size(h, s), act=False)]
                if s == 1 and c == c_out:
                    ks.append(KernelSpec("add", c, c, h, h, quantized=False))
            else:
                ks += ir_kernels(c, c_out, s, h, h, 3, e, 1)
            h, c = conv_out_size(h, s), c_out
    ks.append(conv("pw", c, 1280, h, h))
    return ks + _classifier(1280, h, classes)


REFERENCE_NETS = {"mobilenet_v1": mobilenet_v1_kernels, "mobilenet_v2": mobilenet_v2_kernels}

"""Quantization: fake quantizers with straight-through gradients, bit-mixing convs (EdMIPS-style)."""
from .act import ActQuantizer
from .bits import BitState
from .fake import ConvBNAct, QConv2d, QLinear, fake_quant_weight, quant_error_sq, weight_scale

__all__ = ["ActQuantizer", "BitState", "ConvBNAct", "QConv2d", "QLinear", "fake_quant_weight", "quant_error_sq",
           "weight_scale"]

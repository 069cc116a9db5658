"""Analytic device models: mobile CPUs (A11-like, Snapdragon-835-like) and a bit-serial accelerator
(BitFusion-like). They price one fused kernel (conv+BN+act, add, shuffle, concat, pool, linear) at given
weight and activation bits. They are models, not measurements; calibration lives in bench/calibration.py.

CPU, per fused kernel:  t = max(MACs / (P * e_kind * s_prec) + t_wino, bytes / BW) + t_op
  P       peak fp32 MAC/s = freq * SIMD lanes * vector pipes * thread speed-up,
          thread speed-up(T) = 1 + (T - 1) * thread_efficiency (below linear; bandwidth is shared)
  e_kind  fraction of peak a kernel kind reaches (pointwise, depthwise (~1/3 of pointwise), dense kxk, linear),
          times group_efficiency for grouped 1x1 convs
  s_prec  1 for fp32 (bits > 8); the int8 speed-up of that kind otherwise: 2/4-bit run on int8 kernels,
          so sub-8-bit saves bytes, not MACs
  t_wino  dense 3x3 stride-1 convs run as Winograd: their input and output transforms cost
          winograd_ns_per_elem per input + output element (divided by the thread speed-up); with few channels
          the transforms, not the multiplies, dominate
  bytes   inputs at a_bits, weights at w_bits, outputs at a_bits (32 for fp32)
  t_op    per-kernel overhead; channel shuffle costs shuffle_ns_per_elem per element on top of the copy

Bit-serial accelerator, per kernel (cycles at freq):
  compute = MACs / (units * floor(8/max(a,2)) * floor(8/max(w,2)) * e_kind)
  memory  = bytes * 8 / bandwidth_bits_per_cycle
  t = max(compute, memory) + stall_fraction * min(compute, memory) + t_op_cycles
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..blocks import KernelSpec
from .devices import BitSupport, DeviceModel, register_device_type

FP32_BITS = 32


def is_fp32(w_bits: int, a_bits: int) -> bool:
    return max(w_bits, a_bits) > 8


def kernel_bytes(k: KernelSpec, w_bits: int, a_bits: int) -> float:
    """Bytes a kernel moves: activations at a_bits (fp32: 32), weights at w_bits."""
    if is_fp32(w_bits, a_bits):
        w_bits = a_bits = FP32_BITS
    return k.bytes(w_bits, a_bits)


# ---------------------------------------------------------------------------------------------- CPU

@dataclass(frozen=True)
class CPUParams:
    freq_ghz: float             # clock of the cores used
    simd_lanes: int             # fp32 lanes per vector (128-bit NEON: 4)
    vector_pipes: float         # vector FMA issue per cycle
    eff_pw: float               # fraction of peak reached by 1x1 convs (fp32)
    eff_dw: float               # ... by depthwise convs
    eff_conv: float             # ... by dense kxk convs (stem, SqueezeNext kx1/1xk)
    eff_linear: float           # ... by the classifier (batch 1: a matrix-vector product)
    int8_speedup_pw: float      # int8 / fp32 compute throughput per kind
    int8_speedup_dw: float
    int8_speedup_conv: float
    int8_speedup_linear: float
    group_efficiency: float     # multiplies the efficiency of grouped 1x1 convs
    shuffle_ns_per_elem: float  # channel shuffle cost per element moved
    bandwidth_gbs: float        # achievable memory bandwidth (GB/s), shared by all threads
    t_op_us: float              # per fused-kernel overhead (dispatch, setup, packing)
    thread_efficiency: float    # each extra thread adds this fraction of one core
    eff_conv3x3: Optional[float] = None  # dense 3x3 stride-1 convs (Winograd: can exceed 1 per direct MAC);
                                         # default eff_conv
    qdq_ns_per_elem: float = 1.0         # fp32 fallback of a bit pair the runtime has no kernel for
    winograd_ns_per_elem: float = 0.0    # Winograd transforms of dense 3x3 stride-1 convs, per input + output
                                         # element (only with eff_conv3x3)


class AnalyticCPU(DeviceModel):
    analytic = True

    def __init__(self, params: CPUParams, threads: int = 1, bit_support: BitSupport = BitSupport()):
        self.p = params
        self.threads = threads
        self.bit_support = bit_support
        self.qdq_ns_per_elem = params.qdq_ns_per_elem
        self.speedup = 1.0 + (threads - 1) * params.thread_efficiency
        self.peak_macs_per_s = params.freq_ghz * 1e9 * params.simd_lanes * params.vector_pipes * self.speedup

    def winograd(self, k: KernelSpec) -> bool:
        return bool(self.p.eff_conv3x3) and k.kind == "conv" and k.kh == k.kw == 3 and k.stride == 1 \
            and k.groups == 1

    def efficiency(self, k: KernelSpec, fp32: bool) -> float:
        p = self.p
        kind = "pw" if k.kind == "conv" and k.kh == k.kw == 1 else k.kind
        eff = {"pw": p.eff_pw, "dw": p.eff_dw, "conv": p.eff_conv, "linear": p.eff_linear}[kind]
        if self.winograd(k):
            eff = p.eff_conv3x3
        if not fp32:
            eff *= {"pw": p.int8_speedup_pw, "dw": p.int8_speedup_dw, "conv": p.int8_speedup_conv,
                    "linear": p.int8_speedup_linear}[kind]
        if kind == "pw" and k.groups > 1:
            eff *= p.group_efficiency
        return eff

    def kernel_ms(self, k: KernelSpec, w_bits: int, a_bits: int) -> float:
        p = self.p
        fp32 = is_fp32(w_bits, a_bits)
        memory_s = kernel_bytes(k, w_bits, a_bits) / (p.bandwidth_gbs * 1e9)
        compute_s = k.macs / (self.peak_macs_per_s * self.efficiency(k, fp32)) if k.macs else 0.0
        if p.winograd_ns_per_elem and self.winograd(k):
            compute_s += (k.in_elems + k.out_elems) * p.winograd_ns_per_elem * 1e-9 / self.speedup
        extra_s = k.out_elems * p.shuffle_ns_per_elem * 1e-9 if k.kind == "shuffle" else 0.0
        return (max(compute_s, memory_s) + extra_s + p.t_op_us * 1e-6) * 1e3


register_device_type("analytic_cpu", CPUParams, lambda d: AnalyticCPU(d.params, d.threads, d.bits), analytic=True,
                     doc="mobile CPU, per fused kernel: max(compute, memory) + overhead")


# ---------------------------------------------------------------------------------------------- BitFusion

@dataclass(frozen=True)
class BitFusionParams:
    freq_mhz: float                   # clock
    fusion_units: int                 # BitBricks groups (16 x 32 array = 512), each one 8x8 MAC per cycle
    bandwidth_bits_per_cycle: float   # off-chip bandwidth
    eff_pw: float                     # array utilisation per kernel kind
    eff_dw: float
    eff_conv: float
    eff_linear: float
    stall_fraction: float             # share of the shorter of compute/memory that is not overlapped
    t_op_cycles: float                # per-kernel setup (configuration, pipeline fill)


def bitfusion_speedup(w_bits: int, a_bits: int) -> int:
    """BitFusion's fused 2-bit bricks: floor(8/max(a,2)) * floor(8/max(w,2)) MACs per unit per cycle."""
    w_bits, a_bits = min(w_bits, 8), min(a_bits, 8)
    return (8 // max(a_bits, 2)) * (8 // max(w_bits, 2))


class BitFusion(DeviceModel):
    analytic = True

    def __init__(self, params: BitFusionParams, bit_support: BitSupport = BitSupport()):
        self.p = params
        self.bit_support = bit_support

    def kernel_ms(self, k: KernelSpec, w_bits: int, a_bits: int) -> float:
        p = self.p
        wb, ab = min(w_bits, 8), min(a_bits, 8)
        memory = k.bytes(wb, ab) * 8 / p.bandwidth_bits_per_cycle
        compute = 0.0
        if k.macs:
            kind = "pw" if k.kind == "conv" and k.kh == k.kw == 1 else k.kind
            eff = {"pw": p.eff_pw, "dw": p.eff_dw, "conv": p.eff_conv, "linear": p.eff_linear}[kind]
            compute = k.macs / (p.fusion_units * bitfusion_speedup(wb, ab) * eff)
        cycles = max(compute, memory) + p.stall_fraction * min(compute, memory) + p.t_op_cycles
        return cycles / (p.freq_mhz * 1e6) * 1e3


register_device_type("bitfusion", BitFusionParams, lambda d: BitFusion(d.params, d.bits), analytic=True,
                     doc="bit-serial accelerator: 2/4-bit MACs fuse into 8-bit units")

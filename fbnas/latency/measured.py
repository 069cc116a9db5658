"""Measured backends: time each op as a standalone float32 micro-model on this machine.

Backends: `ort` (onnxruntime, CPU), `torch` (PyTorch eager, CPU) and `cuda` (PyTorch on a CUDA GPU, timed
with CUDA events after a synchronize). Threads are pinned (intra-op = the device's `threads`, inter-op 1),
every timing is preceded by warm-up runs, and p10/p50/p90 over `repeats` runs are kept.

Bits do not change float timing: each distinct (op, shape) is timed once and all its bit variants get that
measurement (recorded in the table's calibration notes).
"""
from __future__ import annotations

import copy
import io
import logging
import os
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..errors import ConfigError
from ..quant.onnx_graph import ort_session
from .devices import Device, DeviceModel, register_device_type
from .keys import OpSignature, unique_shapes

log = logging.getLogger("fbnas.latency")
BACKENDS = ("ort", "torch", "cuda")
ONNX_OPSET = 17
ONNX_IR_VERSION = 8  # onnx may write an IR version newer than onnxruntime accepts


@dataclass(frozen=True)
class MeasuredParams:
    backend: str            # ort | torch | cuda
    warmup: int = 20        # untimed runs before timing
    repeats: int = 100      # timed runs; p10/p50/p90 over them
    batch: int = 1
    graph_unroll: int = 0   # cuda: > 0 captures this many back-to-back calls in one CUDA graph and times replays


@dataclass(frozen=True)
class Stats:
    p10: float
    p50: float
    p90: float
    n: int

    @classmethod
    def of(cls, times_ms: list[float]) -> "Stats":
        a = np.asarray(times_ms, dtype=np.float64)
        p10, p50, p90 = np.percentile(a, [10, 50, 90])
        return cls(float(p10), float(p50), float(p90), len(a))


# ---------------------------------------------------------------------------------------------- micro-models

def signature_module(sig: OpSignature) -> tuple[nn.Module, tuple[int, ...]]:
    """The float module of one signature, exactly as the child network builds that part, and its input
    shape without the batch dimension."""
    from ..blocks import build_op, is_known_op
    from ..quant.bits import BitState
    from ..quant.fake import ConvBNAct, QLinear

    fp = BitState.float()
    if is_known_op(sig.op):
        return build_op(sig.op, sig.c_in, sig.c_out, sig.stride, fp).eval(), (sig.c_in, sig.h, sig.w)
    if sig.op.startswith("conv_k"):
        k = int(sig.op[len("conv_k"):])
        return ConvBNAct(sig.c_in, sig.c_out, k, stride=sig.stride, bit_state=fp).eval(), (sig.c_in, sig.h, sig.w)
    if sig.op == "avgpool":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)).eval(), (sig.c_in, sig.h, sig.w)
    if sig.op == "linear":
        return QLinear(sig.c_in, sig.c_out, bit_state=fp).eval(), (sig.c_in,)
    raise ConfigError(f"no micro-model for op {sig.op!r}")


class ReshapeShuffle(nn.Module):
    """Channel shuffle as reshape-transpose-reshape (what ONNX has; aten::channel_shuffle does not export)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def exportable(module: nn.Module) -> nn.Module:
    """A copy of `module` with every nn.ChannelShuffle replaced by the equivalent ReshapeShuffle."""
    module = copy.deepcopy(module)
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.ChannelShuffle):
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(parent, name.rsplit(".", 1)[-1], ReshapeShuffle(child.groups))
    return module


def onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """Export a float module to ONNX (TorchScript exporter: fast for small graphs), IR version pinned."""
    import onnx

    module = exportable(module)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["x"], output_names=["y"])
    model = onnx.load_from_string(buf.getvalue())
    model.ir_version = min(model.ir_version, ONNX_IR_VERSION)
    return model.SerializeToString()


# ---------------------------------------------------------------------------------------------- timers

def _repeat(run: Callable[[], float], warmup: int, repeats: int) -> Stats:
    for _ in range(warmup):
        run()
    return Stats.of([run() for _ in range(repeats)])


def time_torch(module: nn.Module, example: torch.Tensor, threads: int, warmup: int, repeats: int) -> Stats:
    torch.set_num_threads(threads)
    module = module.eval()

    def run() -> float:
        t0 = time.perf_counter_ns()
        module(example)
        return (time.perf_counter_ns() - t0) / 1e6

    with torch.inference_mode():
        return _repeat(run, warmup, repeats)


def time_cuda(module: nn.Module, example: torch.Tensor, threads: int, warmup: int, repeats: int,
              graph_unroll: int = 0) -> Stats:
    """CUDA events around each run. With graph_unroll > 0 the module's kernels are captured `graph_unroll` times
    back to back in one CUDA graph and each replay's time is divided by graph_unroll: the GPU time of the
    kernels without the host's launch cost (which at batch 1 dominates eager timing and is not additive: a
    micro-model pays a whole call's overhead, a layer inside a model only its kernel launches)."""
    if not torch.cuda.is_available():
        raise ConfigError("backend 'cuda' needs a CUDA GPU and none is visible; use device=host_ort or host_torch")
    module = module.eval().cuda()
    x = example.cuda()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.inference_mode():
        launch = _cuda_graph(module, x, graph_unroll) if graph_unroll > 0 else (lambda: module(x))
        calls = max(graph_unroll, 1)

        def run() -> float:
            start.record()
            launch()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls

        torch.cuda.synchronize()
        return _repeat(run, warmup, repeats)


def _cuda_graph(module: nn.Module, x: torch.Tensor, unroll: int) -> Callable[[], None]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (cuDNN algorithm choice, lazy allocations)
        for _ in range(3):
            module(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(unroll):
            module(x)
    return graph.replay


def time_ort(module: nn.Module, example: torch.Tensor, threads: int, warmup: int, repeats: int) -> Stats:
    sess = ort_session(onnx_bytes(module.eval(), example), threads)
    feed = {"x": example.numpy()}

    def run() -> float:
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        return (time.perf_counter_ns() - t0) / 1e6

    return _repeat(run, warmup, repeats)


TIMERS = {"ort": time_ort, "torch": time_torch, "cuda": time_cuda}


def time_module(module: nn.Module, example: torch.Tensor, backend: str, threads: int, warmup: int,
                repeats: int, graph_unroll: int = 0) -> Stats:
    if backend == "cuda":
        return time_cuda(module, example, threads, warmup, repeats, graph_unroll)
    return TIMERS[backend](module, example, threads, warmup, repeats)


def backend_versions(backend: str) -> dict:
    v = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
         "cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    if backend == "ort":
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
    if backend == "cuda" and torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name()
        v["cuda"] = torch.version.cuda
        v["cudnn"] = torch.backends.cudnn.version()
    return v


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------- device model

class MeasuredDevice(DeviceModel):
    analytic = False

    def __init__(self, device: Device):
        self.device = device
        self.p: MeasuredParams = device.params
        if self.p.backend not in BACKENDS:
            raise ConfigError(f"{device.source}: field 'params.backend' must be one of {list(BACKENDS)}, "
                              f"got {self.p.backend!r}")
        if self.p.graph_unroll and self.p.backend != "cuda":
            raise ConfigError(f"{device.source}: field 'params.graph_unroll' applies to backend 'cuda' only; remove it")

    def time_signature(self, sig: OpSignature, warmup: Optional[int] = None, repeats: Optional[int] = None) -> Stats:
        module, shape = signature_module(sig)
        torch.manual_seed(0)
        example = torch.randn(self.p.batch, *shape)
        return time_module(module, example, self.p.backend, self.device.threads,
                           self.p.warmup if warmup is None else warmup, self.p.repeats if repeats is None else repeats,
                           self.p.graph_unroll)

    def build_table(self, space, signatures: dict[str, OpSignature], device: Device, warmup: Optional[int] = None,
                    repeats: Optional[int] = None, progress: Optional[Callable[[int, int, str], None]] = None):
        from .builder import signature_costs
        from .table import Entry, LatencyTable

        shapes = unique_shapes(signatures.values())
        timed: dict[str, Stats] = {}
        for i, (shape_key, sig) in enumerate(sorted(shapes.items())):
            if not sig.kernels():  # an identity runs no kernel: 0 ms, as in the whole model
                timed[shape_key] = Stats(0.0, 0.0, 0.0, 0)
            else:
                timed[shape_key] = self.time_signature(sig, warmup, repeats)
            if progress:
                progress(i + 1, len(shapes), shape_key)
        entries = {}
        for key, sig in signatures.items():
            s = timed[sig.shape_key]
            macs, nbytes = signature_costs(sig)
            entries[key] = Entry(s.p50, s.p10, s.p90, s.n, macs, nbytes)
        p = self.p
        return LatencyTable(
            device=device.name, source="measured", entries=entries, threads=device.threads, space=space.name,
            backend={"name": p.backend, "versions": backend_versions(p.backend)},
            calibration={"notes": "float32 micro-models, one per distinct (op, shape); every bit variant of a "
                                  "shape shares its measurement (bits do not change float timing)",
                         "warmup": p.warmup if warmup is None else warmup,
                         "repeats": p.repeats if repeats is None else repeats, "batch": p.batch,
                         "graph_unroll": p.graph_unroll,
                         "distinct_shapes_timed": sum(1 for s in timed.values() if s.n)},
            device_config=device.to_dict())


register_device_type("measured", MeasuredParams, MeasuredDevice, analytic=False,
                     doc="this machine: each op timed as a standalone micro-model (ort | torch | cuda)")

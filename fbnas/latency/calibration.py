"""Calibration of the analytic device models against public measurements (shared/latency_anchors/).

Targets (each read from the anchor files, not typed in):
  - sd835 (1 big core) MobileNet-v1/v2 fp32 within +-25% of XNNPACK on a Pixel 2; sd835_4t (4 big cores) too
  - a11 (1 big core) MobileNet-v1 fp32 and int8 within +-25% of TFLite on an iPhone 8
  - sd835 MobileNet-v1 int8/fp32 time ratio in [0.42, 1.0] (TFLite 2018 on a Pixel 2 .. parity)
  - rank agreement with the Pixel 3 (Snapdragon 845) per-block data of HW-NAS-Bench on the FBNet CIFAR-100
    macro: Spearman >= 0.97 over >= 1000 random architectures (MACs alone: ~0.948)

`fit_*` refit the few constants the YAML files mark as fitted (least squares on log ratios).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..blocks import op_kernels
from ..errors import ConfigError
from ..io import repo_root
from ..space import SearchSpace, load_space
from .analytic import AnalyticCPU
from .devices import Device, load_device
from .reference_nets import mobilenet_v1_kernels, mobilenet_v2_kernels

DEFAULT_ANCHORS = repo_root().parent / "shared" / "latency_anchors"
TOLERANCE = 0.25
PIXEL3_CSV = "derived/hwnasbench_fbnet_cifar100_lut_deltas.csv"


@dataclass(frozen=True)
class Target:
    name: str
    device: str
    model: str                 # mobilenet_v1 | mobilenet_v2
    precision: str             # fp32 | int8
    measured_ms: float
    source: str


@dataclass(frozen=True)
class Result:
    name: str
    value: float
    goal: str
    ok: bool
    detail: str = ""


def anchors_dir(path: Optional[str | Path] = None) -> Path:
    p = Path(path) if path else DEFAULT_ANCHORS
    if not (p / "model_anchors.csv").is_file():
        raise ConfigError(f"{p}: latency anchors not found (model_anchors.csv); pass --anchors <dir>")
    return p


def _anchor(rows: list[dict], device: str, framework: str, model: str, precision: str, cores: str) -> float:
    for r in rows:
        if (r["device"], r["framework"], r["model"], r["precision"], r["cores_used"]) == \
                (device, framework, model, precision, cores):
            return float(r["latency_ms"])
    raise ConfigError(f"model_anchors.csv: no row for {device} / {framework} / {model} / {precision} / {cores}")


def model_targets(anchors: Path) -> list[Target]:
    rows = list(csv.DictReader(open(anchors / "model_anchors.csv")))
    xnn, tfl = "XNNPACK (2020-03)", "TFLite (2018 benchmark doc)"
    v1, v2 = "MobileNet-v1 1.0 224", "MobileNet-v2 1.0 224"
    src_x, src_t = "XNNPACK, Pixel 2", "TFLite, iPhone 8"
    return [
        Target("sd835 1t MobileNet-v1 fp32", "sd835", "mobilenet_v1", "fp32",
               _anchor(rows, "Pixel 2", xnn, v1, "fp32", "1 big"), src_x),
        Target("sd835 1t MobileNet-v2 fp32", "sd835", "mobilenet_v2", "fp32",
               _anchor(rows, "Pixel 2", xnn, v2, "fp32", "1 big"), src_x),
        Target("sd835 4t MobileNet-v1 fp32", "sd835_4t", "mobilenet_v1", "fp32",
               _anchor(rows, "Pixel 2", xnn, v1, "fp32", "4 big"), src_x),
        Target("sd835 4t MobileNet-v2 fp32", "sd835_4t", "mobilenet_v2", "fp32",
               _anchor(rows, "Pixel 2", xnn, v2, "fp32", "4 big"), src_x),
        Target("a11 1t MobileNet-v1 fp32", "a11", "mobilenet_v1", "fp32",
               _anchor(rows, "iPhone 8", tfl, v1, "fp32", "1 big"), src_t),
        Target("a11 1t MobileNet-v1 int8", "a11", "mobilenet_v1", "int8",
               _anchor(rows, "iPhone 8", tfl, v1, "uint8", "1 big"), src_t),
    ]


NETS = {"mobilenet_v1": mobilenet_v1_kernels, "mobilenet_v2": mobilenet_v2_kernels}
BITS = {"fp32": 32, "int8": 8}


def net_ms(model, net: str, precision: str) -> float:
    b = BITS[precision]
    return model.op_ms(NETS[net](), b, b)


def _device_model(device: Device, params=None):
    return device.model() if params is None else replace(device, params=params).model()


def check_model_targets(anchors: Path, devices: Optional[dict[str, Device]] = None) -> list[Result]:
    devices = devices or {}
    out = []
    for t in model_targets(anchors):
        dev = devices.get(t.device) or load_device(t.device)
        pred = net_ms(dev.model(), t.model, t.precision)
        err = pred / t.measured_ms - 1
        out.append(Result(t.name, pred, f"{t.measured_ms:g} ms +-25% ({t.source})", abs(err) <= TOLERANCE,
                          f"{err:+.1%}"))
    sd835 = devices.get("sd835") or load_device("sd835")
    m = sd835.model()
    ratio = net_ms(m, "mobilenet_v1", "int8") / net_ms(m, "mobilenet_v1", "fp32")
    out.append(Result("sd835 MobileNet-v1 int8/fp32", ratio, "in [0.42, 1.0]", 0.42 <= ratio <= 1.0))
    return out


# ---------------------------------------------------------------------------------------------- Pixel 3 ranks

def pixel3_deltas(anchors: Path, space: SearchSpace) -> tuple[np.ndarray, float]:
    """[n_layers, n_ops] Pixel 3 latency deltas vs ir_k3_e1 at each layer of `space`, and the all-k3_e1 total.
    Fails if the CSV's (H_in, C_in, C_out, stride) groups do not match the space's layers."""
    rows = list(csv.DictReader(open(anchors / PIXEL3_CSV)))
    base = next(float(r["delta_ms_vs_k3e1_pixel3"]) for r in rows if r["group"].startswith("base_allk3e1"))
    delta = {}
    for r in rows:
        if r["H_in"]:
            op = "skip" if r["op"] == "skip" else f"ir_{r['op']}"
            delta[(int(r["H_in"]), int(r["Cin"]), int(r["Cout"]), int(r["stride"]), op)] = \
                float(r["delta_ms_vs_k3e1_pixel3"])
    out = np.zeros((space.num_layers, len(space.candidates)))
    for l in space.layers():
        for i, op in enumerate(space.candidates):
            key = (l.h_in, l.c_in, l.c_out, l.stride, op)
            if key not in delta:
                raise ConfigError(f"{PIXEL3_CSV}: no row for layer {l.index} {key}; the space does not match "
                                  f"the HW-NAS-Bench FBNet CIFAR-100 macro")
            out[l.index, i] = delta[key]
    return out, base


def layer_op_ms(model, space: SearchSpace, bits: int) -> np.ndarray:
    return np.array([[model.op_ms(op_kernels(op, l.c_in, l.c_out, l.stride, l.h_in, l.w_in), bits, bits)
                      for op in space.candidates] for l in space.layers()])


def layer_op_macs(space: SearchSpace) -> np.ndarray:
    return np.array([[sum(k.macs for k in op_kernels(op, l.c_in, l.c_out, l.stride, l.h_in, l.w_in))
                      for op in space.candidates] for l in space.layers()], dtype=np.float64)


def random_archs(space: SearchSpace, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(space.candidates), size=(n, space.num_layers))


def check_pixel3_ranks(anchors: Path, device: Device, n_archs: int = 2000, seed: int = 0,
                       bits: tuple[int, ...] = (32, 8)) -> list[Result]:
    from scipy.stats import spearmanr

    space = load_space("fbnet_cifar100")
    deltas, base = pixel3_deltas(anchors, space)
    idx = random_archs(space, n_archs, seed)
    rows = np.arange(space.num_layers)
    truth = base + deltas[rows, idx].sum(1)
    macs_rho = spearmanr(truth, layer_op_macs(space)[rows, idx].sum(1)).correlation
    out = [Result(f"Pixel 3 rank: MACs alone ({n_archs} archs)", macs_rho, "baseline (README: 0.948)", True)]
    for b in bits:
        pred = layer_op_ms(device.model(), space, b)[rows, idx].sum(1)
        rho = spearmanr(truth, pred).correlation
        label = "fp32" if b > 8 else f"w{b}a{b}"
        out.append(Result(f"Pixel 3 rank: {device.name} {label} ({n_archs} archs)", rho, ">= 0.97", rho >= 0.97))
    return out


# ---------------------------------------------------------------------------------------------- fitting

def _least_squares(residuals: Callable[[np.ndarray], np.ndarray], x0: list[float], lo: list[float],
                   hi: list[float]) -> np.ndarray:
    from scipy.optimize import least_squares

    return least_squares(residuals, np.array(x0), bounds=(np.array(lo), np.array(hi))).x


def fit_sd835(anchors: Path) -> dict[str, float]:
    """eff_pw and eff_dw from MobileNet-v1/v2 at 1 thread, thread_efficiency from 4 threads (XNNPACK, Pixel 2)."""
    base = load_device("sd835")
    targets = [t for t in model_targets(anchors) if t.device in ("sd835", "sd835_4t")]

    def resid(x):
        p = replace(base.params, eff_pw=x[0], eff_dw=x[1], thread_efficiency=x[2])
        return np.array([math.log(net_ms(AnalyticCPU(p, 4 if t.device == "sd835_4t" else 1), t.model, t.precision)
                                  / t.measured_ms) for t in targets])

    x = _least_squares(resid, [0.7, 0.25, 0.7], [0.05, 0.02, 0.1], [1.0, 1.0, 1.0])
    return {"eff_pw": float(x[0]), "eff_dw": float(x[1]), "thread_efficiency": float(x[2])}


def fit_a11(anchors: Path) -> dict[str, float]:
    """eff_pw (eff_dw kept at the sd835 dw/pw ratio) from fp32, int8_speedup_pw from int8 (TFLite, iPhone 8)."""
    base, ref = load_device("a11"), load_device("sd835").params
    ratio = ref.eff_dw / ref.eff_pw
    targets = [t for t in model_targets(anchors) if t.device == "a11"]

    def params(x):
        return replace(base.params, eff_pw=x[0], eff_dw=x[0] * ratio, int8_speedup_pw=x[1])

    def resid(x):
        return np.array([math.log(net_ms(AnalyticCPU(params(x)), t.model, t.precision) / t.measured_ms)
                         for t in targets])

    x = _least_squares(resid, [0.6, 1.3], [0.05, 1.0], [1.0, 1.4])
    return {"eff_pw": float(x[0]), "eff_dw": float(x[0] * ratio), "int8_speedup_pw": float(x[1])}

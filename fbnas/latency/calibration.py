"""Calibration of the analytic device models against whole-network measurements, and checks of what they rank.

Data (inside the package, with sources: fbnas/latency/data/README.md):
  whole_model_latency.csv      published whole-network latencies (Snapdragon 835: ncnn, XNNPACK, TFLite; A11:
                               TFLite), one row per (device, framework, threads, network, precision)
  pixel3_fbnet_cifar100_block_deltas.csv   HW-NAS-Bench per-block latencies on a Pixel 3 (FBNet CIFAR-100 macro)

Users deploy whole networks, so the device constants are fitted to whole networks: least squares on
log(predicted / measured) over every fp32 row of the device's SoC, with one fitted level factor per framework
(the device's reference framework fixed at 1: the model is that runtime; the others differ by their kernels'
quality, not by what the hardware finds expensive). Per-block sums (Pixel 3) are a check, not a fit target.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..blocks import op_kernels
from ..errors import ConfigError
from ..space import SearchSpace, load_space
from .analytic import AnalyticCPU
from .devices import Device, load_device
from .reference_nets import reference_kernels

DATA_DIR = Path(__file__).resolve().parent / "data"
WHOLE_MODEL_CSV = DATA_DIR / "whole_model_latency.csv"
PIXEL3_CSV = DATA_DIR / "pixel3_fbnet_cifar100_block_deltas.csv"
TOLERANCE = 0.25


@dataclass(frozen=True)
class Measurement:
    device: str
    soc: str
    threads: int
    framework: str
    model: str          # a reference network (reference_nets.reference_net_names())
    precision: str      # fp32 | int8
    input_size: int
    ms: float
    source: str

    @property
    def group(self) -> str:
        return f"{self.soc} / {self.framework} / {self.threads}t / {self.precision}"


@dataclass(frozen=True)
class Result:
    name: str
    value: float
    goal: str
    ok: bool
    detail: str = ""


def whole_model_measurements(path: Optional[str | Path] = None) -> list[Measurement]:
    path = Path(path) if path else WHOLE_MODEL_CSV
    with open(path, newline="") as f:
        return [Measurement(r["device"], r["soc"], int(r["cores"].split()[0]), r["framework"], r["model"],
                            r["precision"], int(r["input_size"]), float(r["latency_ms"]), r["source"])
                for r in csv.DictReader(f)]


def net_ms(model, net: str, bits: int = 32, size: int = 224) -> float:
    return model.op_ms(reference_kernels(net, size), bits, bits)


def net_macs(net: str, size: int = 224) -> int:
    return sum(k.macs for k in reference_kernels(net, size))


# ---------------------------------------------------------------------------------------------- fitting

@dataclass(frozen=True)
class FitSpec:
    """Which constants of which device are fitted to which measurements."""
    device: str                       # the 1-thread device file (threads come from each row)
    soc: str
    reference_framework: str          # its level is the device's level (factor 1)
    fields: tuple[str, ...]           # CPUParams fields fitted
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    exclude_frameworks: tuple[str, ...] = ()


FITS = {
    "sd835": FitSpec("sd835", "Snapdragon 835", "XNNPACK (2020-03)",
                     ("eff_pw", "eff_dw", "eff_conv", "eff_conv3x3", "eff_linear", "bandwidth_gbs", "t_op_us",
                      "thread_efficiency", "winograd_ns_per_elem"),
                     # eff_conv3x3 <= 4: Winograd F(6x6, 3x3) does 5.06x fewer multiplies than a direct 3x3 conv,
                     # at ~80% of peak
                     (0.05, 0.02, 0.05, 0.05, 0.01, 1.0, 0.5, 0.1, 0.0),
                     (1.0, 1.0, 1.0, 4.0, 1.0, 40.0, 200.0, 1.0, 50.0),
                     # two networks only, one of uncertain version (SqueezeNet 1.0 or 1.1): its level factor
                     # would be fitted from the same two rows it is checked on
                     exclude_frameworks=("TFLite (2018 benchmark doc)",)),
}


@dataclass
class Fit:
    spec: FitSpec
    params: dict[str, float]
    framework_factor: dict[str, float]
    rows: list[Measurement]

    def model(self, base: Device, threads: int = 1) -> AnalyticCPU:
        return AnalyticCPU(replace(base.params, **self.params), threads)

    def predict(self, base: Device, m: Measurement) -> float:
        """fp32 rows at the fitted constants; int8 rows also at the base file's int8 speed-ups (not fitted)."""
        bits = 32 if m.precision == "fp32" else 8
        return self.framework_factor[m.framework] * net_ms(self.model(base, m.threads), m.model, bits, m.input_size)


def fit_rows(spec: FitSpec, rows: Optional[list[Measurement]] = None) -> list[Measurement]:
    rows = rows if rows is not None else whole_model_measurements()
    return [m for m in rows if m.soc == spec.soc and m.precision == "fp32"
            and m.framework not in spec.exclude_frameworks]


def fit_device(spec: FitSpec, rows: Sequence[Measurement]) -> Fit:
    from scipy.optimize import least_squares

    base = load_device(spec.device)
    frameworks = sorted({m.framework for m in rows} - {spec.reference_framework})
    n = len(spec.fields)
    kernels = {(m.model, m.input_size): reference_kernels(m.model, m.input_size) for m in rows}

    def unpack(x):
        return dict(zip(spec.fields, x[:n])), {spec.reference_framework: 1.0, **dict(zip(frameworks, x[n:]))}

    def resid(x):
        params, factor = unpack(x)
        p = replace(base.params, **params)
        models = {t: AnalyticCPU(p, t) for t in {m.threads for m in rows}}
        return np.array([math.log(factor[m.framework] * models[m.threads].op_ms(kernels[m.model, m.input_size], 32, 32)
                                  / m.ms) for m in rows])

    x0 = [min(max(getattr(base.params, f) or (lo + hi) / 2, lo), hi)
          for f, lo, hi in zip(spec.fields, spec.lower, spec.upper)]
    x = least_squares(resid, np.array(x0 + [1.0] * len(frameworks)),
                      bounds=(np.array(list(spec.lower) + [0.05] * len(frameworks)),
                              np.array(list(spec.upper) + [20.0] * len(frameworks)))).x
    params, factor = unpack([float(v) for v in x])
    return Fit(spec, params, factor, list(rows))


def fit_a11(rows: Optional[Sequence[Measurement]] = None) -> dict[str, float]:
    """The A11 model keeps the sd835 file's ratios between kernel kinds (no A11 data separates them); one
    factor on every efficiency is fitted to MobileNet-v1 fp32 and int8_speedup_pw to its int8 time (TFLite,
    iPhone 8). The Winograd transform cost follows the same factor and the ratio of the two cores' peaks."""
    from scipy.optimize import least_squares

    rows = list(rows) if rows is not None else whole_model_measurements()
    base, ref = load_device("a11"), load_device("sd835").params
    targets = [m for m in rows if m.soc == "Apple A11" and m.model == "mobilenet_v1"]
    kinds = ("eff_pw", "eff_dw", "eff_conv", "eff_conv3x3", "eff_linear")

    def peak(p) -> float:
        return p.freq_ghz * p.simd_lanes * p.vector_pipes

    def params(x):
        return replace(base.params, **{k: getattr(ref, k) * x[0] for k in kinds}, int8_speedup_pw=x[1],
                       winograd_ns_per_elem=ref.winograd_ns_per_elem * peak(ref) / (peak(base.params) * x[0]))

    def resid(x):
        return np.array([math.log(net_ms(AnalyticCPU(params(x)), m.model, 32 if m.precision == "fp32" else 8)
                                  / m.ms) for m in targets])

    x = least_squares(resid, np.array([1.0, 1.3]), bounds=([0.1, 1.0], [3.0, 1.4])).x
    p = params(x)
    return {**{k: float(getattr(p, k)) for k in (*kinds, "winograd_ns_per_elem")},
            "int8_speedup_pw": float(x[1])}


def leave_one_network_out(spec: FitSpec, rows: Sequence[Measurement],
                          also: Sequence[Measurement] = ()) -> dict[Measurement, float]:
    """Each network's rows predicted by a fit to every other network's rows; rows in `also` (e.g. int8 rows, which
    the fit does not use) are predicted by the fit that held their network out."""
    base = load_device(spec.device)
    out = {}
    for net in sorted({m.model for m in rows}):
        held = [m for m in [*rows, *also] if m.model == net]
        rest = [m for m in rows if m.model != net]
        if not {m.framework for m in held} <= {m.framework for m in rest}:
            continue  # a framework with no other network has no level to predict from
        fit = fit_device(spec, rest)
        for m in held:
            out[m] = fit.predict(base, m)
    return out


# ---------------------------------------------------------------------------------------------- checks

def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).correlation)


def rank_groups(rows: Sequence[Measurement], min_size: int = 4) -> dict[str, list[Measurement]]:
    groups: dict[str, list[Measurement]] = {}
    for m in rows:
        groups.setdefault(m.group, []).append(m)
    return {g: ms for g, ms in groups.items() if len(ms) >= min_size}


def check_whole_model_ranks(device: Device, rows: Sequence[Measurement],
                            predict: Optional[Callable[[Measurement], float]] = None,
                            label: str = "zero-shot") -> list[Result]:
    """Per group of networks measured together: Spearman of the device model vs MACs alone."""
    out = []
    for g, ms in sorted(rank_groups(rows).items()):
        truth = [m.ms for m in ms]
        macs_rho = _spearman(truth, [net_macs(m.model, m.input_size) for m in ms])
        if predict is None:
            pred = [net_ms(AnalyticCPU(device.params, m.threads, device.bits), m.model,
                           32 if m.precision == "fp32" else 8, m.input_size) for m in ms]
        else:
            pred = [predict(m) for m in ms]
        rho = _spearman(truth, pred)
        out.append(Result(f"{g} ({len(ms)} nets), {label}", rho, f">= MACs alone ({macs_rho:.3f})",
                          rho >= macs_rho - 1e-9, f"MACs {macs_rho:.3f}"))
    return out


ANCHOR_TARGETS = (  # (device file, network, precision, framework, threads): within +-25% of the measurement
    ("sd835", "mobilenet_v1", "fp32", "XNNPACK (2020-03)", 1),
    ("sd835", "mobilenet_v2", "fp32", "XNNPACK (2020-03)", 1),
    ("sd835_4t", "mobilenet_v1", "fp32", "XNNPACK (2020-03)", 4),
    ("sd835_4t", "mobilenet_v2", "fp32", "XNNPACK (2020-03)", 4),
    ("a11", "mobilenet_v1", "fp32", "TFLite (2018 benchmark doc)", 1),
    ("a11", "mobilenet_v1", "int8", "TFLite (2018 benchmark doc)", 1),
)


def check_model_targets(rows: Optional[Sequence[Measurement]] = None,
                        devices: Optional[dict[str, Device]] = None) -> list[Result]:
    rows = list(rows) if rows is not None else whole_model_measurements()
    devices = devices or {}
    out = []
    for dev_name, net, prec, framework, threads in ANCHOR_TARGETS:
        dev = devices.get(dev_name) or load_device(dev_name)
        soc = "Apple A11" if dev_name == "a11" else "Snapdragon 835"
        m = next((m for m in rows if (m.soc, m.model, m.precision, m.framework, m.threads) ==
                  (soc, net, prec, framework, threads)), None)
        if m is None:
            raise ConfigError(f"{WHOLE_MODEL_CSV.name}: no row for {soc} / {framework} / {net} / {prec} / {threads}t")
        pred = net_ms(dev.model(), net, 32 if prec == "fp32" else 8)
        err = pred / m.ms - 1
        out.append(Result(f"{dev_name} {net} {prec}", pred, f"{m.ms:g} ms +-25% ({framework}, {m.device})",
                          abs(err) <= TOLERANCE, f"{err:+.1%}"))
    sd835 = devices.get("sd835") or load_device("sd835")
    ratio = net_ms(sd835.model(), "mobilenet_v1", 8) / net_ms(sd835.model(), "mobilenet_v1", 32)
    out.append(Result("sd835 mobilenet_v1 int8/fp32", ratio, "in [0.42, 1.0]", 0.42 <= ratio <= 1.0))
    return out


# ---------------------------------------------------------------------------------------------- Pixel 3 ranks

def pixel3_deltas(space: SearchSpace, path: Optional[str | Path] = None) -> tuple[np.ndarray, float]:
    """[n_layers, n_ops] Pixel 3 latency deltas vs ir_k3_e1 at each layer of `space`, and the all-k3_e1 total.
    Fails if the CSV's (H_in, C_in, C_out, stride) groups do not match the space's layers."""
    path = Path(path) if path else PIXEL3_CSV
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
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
                raise ConfigError(f"{path.name}: no row for layer {l.index} {key}; the space does not match "
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


def pixel3_latencies(space: SearchSpace, idx: np.ndarray) -> np.ndarray:
    deltas, base = pixel3_deltas(space)
    return base + deltas[np.arange(space.num_layers), idx].sum(1)


def check_pixel3_ranks(device: Device, n_archs: int = 2000, seed: int = 0,
                       bits: tuple[int, ...] = (32, 8)) -> list[Result]:
    space = load_space("fbnet_cifar100")
    idx = random_archs(space, n_archs, seed)
    rows = np.arange(space.num_layers)
    truth = pixel3_latencies(space, idx)
    macs_rho = _spearman(truth, layer_op_macs(space)[rows, idx].sum(1))
    out = [Result(f"Pixel 3 per-block sums: MACs alone ({n_archs} archs)", macs_rho, "baseline", True)]
    for b in bits:
        rho = _spearman(truth, layer_op_ms(device.model(), space, b)[rows, idx].sum(1))
        label = "fp32" if b > 8 else f"w{b}a{b}"
        out.append(Result(f"Pixel 3 per-block sums: {device.name} {label} ({n_archs} archs)", rho, ">= 0.97",
                          rho >= 0.97))
    return out

"""Few-shot calibration of a device model from whole-model timings, the way a user with one phone works:

    fbnas lut export-archs space=S device=BASE n=20 seed=0 out_dir=D   # n architectures spanning the space's
                                                                       # latency range, as ONNX whole models
    (time D/*.onnx on the device; fill D/measurements.csv: arch,ms)
    fbnas lut calibrate space=S device=BASE measurements=D/measurements.csv out=NEW.yaml

`calibrate` refits the base model's constants (kernel-kind efficiencies, bandwidth, per-kernel overhead) by least
squares on log(predicted / measured), pulled gently toward the base values so that a constant the timings cannot
separate keeps its base value, and writes a device file that extends BASE. It reports the constants before and
after, the in-sample error and a leave-one-out Spearman / MAPE, next to the base model's and MACs' rank agreement.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..arch import Arch, load_arch
from ..blocks import KernelSpec
from ..errors import ConfigError
from ..io import atomic_write_json, atomic_write_text
from ..space import SearchSpace
from .archfile import ops_line
from .devices import DEVICES_DIR, Device
from .keys import arch_signatures

PRECISIONS = ("int8", "fp32")
# the constants a few whole-model timings can move, per device type
FITTED = {
    "analytic_cpu": ("eff_pw", "eff_dw", "eff_conv", "bandwidth_gbs", "t_op_us"),
    "bitfusion": ("eff_pw", "eff_dw", "eff_conv", "bandwidth_bits_per_cycle", "t_op_cycles"),
}
PRIOR_WEIGHT = 0.05     # pull of log(constant / base constant) against the log-ratio residuals
BOUND = 20.0            # constants stay within base / 20 .. base * 20


@dataclass(frozen=True)
class Timing:
    line: int
    arch: Arch
    ms: float
    text: str          # the arch cell as written


def priced_parts(arch: Arch, precision: str = "int8") -> list[tuple[KernelSpec, int, int]]:
    """Every fused kernel of `arch` with the bits it runs at (fp32: 32/32 everywhere)."""
    out = []
    for _, sig in arch_signatures(arch):
        w, a = (32, 32) if precision == "fp32" else (sig.w_bits, sig.a_bits)
        out += [(k, w, a) for k in sig.kernels()]
    return out


def arch_ms(device: Device, arch: Arch, precision: str = "int8", params=None) -> float:
    model = (replace(device, params=params) if params is not None else device).model()
    return float(sum(model.runtime_kernel_ms(k, w, a) for k, w, a in priced_parts(arch, precision)))


# ---------------------------------------------------------------------------------------------- export-archs

def arch_key(arch: Arch) -> tuple:
    """What tells two architectures of one space apart: each layer's op and bits."""
    return tuple((l.op, l.w_bits, l.a_bits) for l in arch.layers)


def random_arch(space: SearchSpace, device: Device, rng: np.random.Generator) -> Arch:
    w_bits, a_bits = device.search_bits(space.w_bits, space.a_bits)
    n = space.num_layers
    ops = [space.candidates[i] for i in rng.integers(0, len(space.candidates), n)]
    return Arch.from_space(space, ops, [int(w_bits[i]) for i in rng.integers(0, len(w_bits), n)],
                           [int(a_bits[i]) for i in rng.integers(0, len(a_bits), n)])


def random_pool(space: SearchSpace, device: Device, size: int, seed: int) -> list[Arch]:
    """Up to `size` distinct random architectures (ops uniform over the candidates, bits over the pairs the
    device runs)."""
    rng = np.random.default_rng(seed)
    seen, out = set(), []
    for _ in range(size):
        arch = random_arch(space, device, rng)
        key = arch_key(arch)
        if key not in seen:
            seen.add(key)
            out.append(arch)
    return out


def spread_indices(latencies: Sequence[float], n: int) -> list[int]:
    """Indices of n items whose latencies are spread evenly over the range (evenly spaced ranks)."""
    order = np.argsort(latencies, kind="stable")
    return [int(order[int(round(q))]) for q in np.linspace(0, len(order) - 1, n)]


def spanning_archs(space: SearchSpace, device: Device, n: int, seed: int, pool: int = 0,
                   precision: str = "int8") -> list[Arch]:
    """n distinct architectures whose base-model latencies are spread evenly over the range of `pool` random
    ones."""
    if n < 2:
        raise ConfigError(f"field 'n' is {n}; export at least 2 architectures (20 is a good start)")
    cands = random_pool(space, device, pool or max(50 * n, 500), seed)
    if len(cands) < n:
        raise ConfigError(f"space {space.name} has only {len(cands)} distinct architectures here; lower field 'n'")
    lat = [arch_ms(device, a, precision) for a in cands]
    return [cands[i] for i in sorted(set(spread_indices(lat, n)), key=lambda i: lat[i])]


def arch_line(arch: Arch) -> str:
    return " ".join(f"{l.op}:w{l.w_bits}a{l.a_bits}" for l in arch.layers)


def export_archs(space: SearchSpace, device: Device, n: int, seed: int, out_dir: str | Path,
                 precision: str = "int8") -> list[Path]:
    """Write arch_NNN.json and arch_NNN.onnx for each spanning architecture (int8: the channel-aligned QDQ graph
    `fbnas export` ships, random weights; fp32: the float graph), archs.txt, and a measurements.csv template
    (never over a filled one)."""
    from ..io import atomic_write_bytes

    if precision not in PRECISIONS:
        raise ConfigError(f"field 'precision' is {precision!r}; use one of {', '.join(PRECISIONS)}")
    out_dir = Path(out_dir)
    archs = spanning_archs(space, device, n, seed, precision=precision)
    files = []
    for i, arch in enumerate(archs):
        stem = f"arch_{i:03d}"
        atomic_write_json(out_dir / f"{stem}.json", arch.to_dict())
        atomic_write_bytes(out_dir / f"{stem}.onnx", whole_model_onnx(arch, precision, seed))
        files.append(out_dir / f"{stem}.onnx")
    atomic_write_text(out_dir / "archs.txt", "".join(f"arch_{i:03d}.json  # {arch_line(a)}\n"
                                                    for i, a in enumerate(archs)))
    template = out_dir / "measurements.csv"
    if not template.exists():
        atomic_write_text(template, "arch,ms\n" + "".join(f"arch_{i:03d}.json,\n" for i in range(len(archs))))
    atomic_write_json(out_dir / "export.json", {"space": space.name, "device": device.name, "n": len(archs),
                                                "seed": seed, "precision": precision,
                                                "notes": "time each arch_NNN.onnx (batch 1, ms) on the device and "
                                                         "fill measurements.csv, then run `fbnas lut calibrate`"})
    return files


def whole_model_onnx(arch: Arch, precision: str, seed: int) -> bytes:
    import torch

    if precision == "int8":
        from .measured_int8 import int8_graph

        return int8_graph(arch, seed).SerializeToString()
    from ..model import build_model
    from .measured import exportable, onnx_bytes

    torch.manual_seed(seed)
    net = exportable(build_model(arch, quantized=False).eval())
    return onnx_bytes(net, torch.randn(1, arch.in_channels, arch.input_size, arch.input_size))


# ---------------------------------------------------------------------------------------------- measurements

def read_timings(path: str | Path, space: SearchSpace, min_rows: int = 1) -> list[Timing]:
    """measurements.csv: header `arch,ms`; arch = an arch.json path (relative to the CSV) or the ops of the
    searchable layers (`ir_k3_e6:w8a8 skip ...`, as `fbnas lut predict` reads). Every bad row is a one-line error
    naming the line; nothing is fitted unless every row is good."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: measurements file not found (field 'measurements')")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the measurements as a UTF-8 CSV") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip() for c in rows[0]] != ["arch", "ms"]:
        raise ConfigError(f"{path}: line 1: the header must be exactly 'arch,ms'")
    out: list[Timing] = []
    seen: dict[tuple, int] = {}
    w_default, a_default = max(space.w_bits), max(space.a_bits)
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        where = f"{path}: line {n}"
        if len(row) != 2:
            raise ConfigError(f"{where}: expected 2 columns (arch,ms), got {len(row)}")
        cell, ms_text = row[0].strip(), row[1].strip()
        try:
            ms = float(ms_text)
        except ValueError:
            raise ConfigError(f"{where}: ms {ms_text!r} is not a number (fill in the measured milliseconds)") from None
        if not math.isfinite(ms) or ms <= 0:
            raise ConfigError(f"{where}: ms must be a positive number, got {ms_text!r}")
        arch = _arch_cell(cell, path, space, where, w_default, a_default)
        key = arch_key(arch)
        if key in seen:
            raise ConfigError(f"{where}: the same architecture as line {seen[key]}; give each architecture once "
                              f"(average repeated timings)")
        seen[key] = n
        out.append(Timing(n, arch, ms, cell))
    if len(out) < min_rows:
        raise ConfigError(f"{path}: {len(out)} measurements; the fit has {min_rows - 1} constants and needs at least "
                          f"{min_rows} rows (20 are recommended)")
    return out


def _arch_cell(cell: str, csv_path: Path, space: SearchSpace, where: str, w: int, a: int) -> Arch:
    if cell.endswith(".json"):
        p = Path(cell)
        p = p if p.is_absolute() else csv_path.parent / p
        if not p.is_file():
            raise ConfigError(f"{where}: {p}: arch.json not found")
        arch = load_arch(p)
        if arch.space != space.name:
            raise ConfigError(f"{where}: {p.name} is an architecture of space {arch.space!r}, not {space.name!r}; "
                              f"calibrate with space={arch.space} or time architectures of {space.name}")
        return arch
    return ops_line(cell, space, w, a, where)


# ---------------------------------------------------------------------------------------------- fit

@dataclass
class Calibration:
    base: Device
    fields: tuple[str, ...]
    before: dict[str, float]
    after: dict[str, float]
    timings: list[Timing]
    precision: str
    in_sample: dict[str, float]
    leave_one_out: dict[str, float]
    zero_shot: dict[str, float]
    macs_spearman: float

    def device(self, name: str) -> Device:
        return replace(self.base, name=name, params=replace(self.base.params, **self.after))


def fit_constants(base: Device, timings: Sequence[Timing], precision: str = "int8") -> dict[str, float]:
    from scipy.optimize import least_squares

    fields = fitted_fields(base)
    x0 = np.log([float(getattr(base.params, f)) for f in fields])
    parts = [priced_parts(t.arch, precision) for t in timings]
    measured = np.log([t.ms for t in timings])

    def resid(x):
        model = replace(base, params=replace(base.params, **dict(zip(fields, np.exp(x))))).model()
        pred = np.log([sum(model.runtime_kernel_ms(k, w, a) for k, w, a in p) for p in parts])
        return np.concatenate([pred - measured, PRIOR_WEIGHT * (x - x0)])

    lo, hi = x0 - math.log(BOUND), x0 + math.log(BOUND)
    x = least_squares(resid, x0, bounds=(lo, hi)).x
    return {f: float(v) for f, v in zip(fields, np.exp(x))}


def fitted_fields(base: Device) -> tuple[str, ...]:
    if base.type not in FITTED:
        raise ConfigError(f"{base.source}: device {base.name!r} is of type {base.type!r}; `fbnas lut calibrate` fits "
                          f"the constants of an analytic model ({', '.join(sorted(FITTED))}). A measured or imported "
                          f"table is already timed on its device")
    return FITTED[base.type]


def _scores(truth: Sequence[float], pred: Sequence[float]) -> dict[str, float]:
    from scipy.stats import spearmanr

    t, p = np.asarray(truth), np.asarray(pred)
    return {"spearman": float(spearmanr(t, p).correlation), "mape": float(np.mean(np.abs(p / t - 1)))}


def calibrate(base: Device, timings: Sequence[Timing], precision: str = "int8") -> Calibration:
    fields = fitted_fields(base)
    if len(timings) < len(fields) + 1:
        raise ConfigError(f"{len(timings)} measurements; the fit has {len(fields)} constants and needs at least "
                          f"{len(fields) + 1} rows (20 are recommended)")
    after = fit_constants(base, timings, precision)
    truth = [t.ms for t in timings]
    fitted = replace(base.params, **after)
    in_sample = _scores(truth, [arch_ms(base, t.arch, precision, fitted) for t in timings])
    loo = []
    for i in range(len(timings)):
        rest = [t for j, t in enumerate(timings) if j != i]
        p = replace(base.params, **fit_constants(base, rest, precision))
        loo.append(arch_ms(base, timings[i].arch, precision, p))
    zero = _scores(truth, [arch_ms(base, t.arch, precision) for t in timings])
    macs = _scores(truth, [t.arch.macs() for t in timings])["spearman"]
    return Calibration(base, fields, {f: float(getattr(base.params, f)) for f in fields}, after, list(timings),
                       precision, in_sample, _scores(truth, loo), zero, macs)


def device_yaml(cal: Calibration, name: str, measurements: str, space: str) -> str:
    """A device file extending the base device with the fitted constants (self-contained when the base is not a
    shipped device)."""
    base = cal.base
    shipped = Path(base.source).resolve() == (DEVICES_DIR / f"{base.name}.yaml").resolve()
    lines = [f"# Calibrated from {len(cal.timings)} whole-model timings ({cal.precision}) of space {space}:",
             f"#   fbnas lut calibrate space={space} device={base.name} measurements={measurements} out=...",
             f"# leave-one-out Spearman {cal.leave_one_out['spearman']:.3f}, MAPE {cal.leave_one_out['mape']:.1%}; "
             f"base model Spearman {cal.zero_shot['spearman']:.3f}; MACs {cal.macs_spearman:.3f}"]
    if shipped:
        lines += [f"defaults: [{base.name}, _self_]", f"name: {name}",
                  f"description: {base.name} calibrated to {len(cal.timings)} whole-model timings", "params:"]
        lines += [f"  {f}: {v:.6g}" for f, v in cal.after.items()]
    else:
        import yaml

        raw = cal.device(name).to_dict()
        raw["description"] = f"{base.name} calibrated to {len(cal.timings)} whole-model timings"
        lines.append(yaml.safe_dump(raw, sort_keys=False).rstrip())
    return "\n".join(lines) + "\n"


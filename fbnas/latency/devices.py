"""One registry of devices: conf/device/<name>.yaml files, each naming a model type from one registry of
device-model types (analytic_cpu, bitfusion, measured, ...).

    name: sd835
    type: analytic_cpu
    description: Snapdragon-835-like CPU model (not a measurement) ...
    threads: 1
    params: {freq_ghz: 2.4, ...}           # validated by the type's parameter dataclass
    bits: {w8a8: int8, default: fp32_fallback}   # how the runtime executes each (weights, activations) pair

`bits` (optional; default: every pair `native`) says how the device's runtime executes each bit pair:
  native         the device's model (or measured table) prices the pair as it is (bit-serial accelerators)
  int8           int8 kernels; weights or activations below 8 bits are widened to int8 when the model loads,
                 so they cost what W8A8 costs (int4 weights unpacked to int8)
  fp32_fallback  no kernel for the pair: the runtime dequantizes to float and runs fp32 kernels, plus a
                 quantize-dequantize pass per tensor (what onnxruntime does with a 4-bit QDQ graph)
  unsupported    the runtime cannot run the pair at all
The search offers only pairs that run `native` or `int8` (a fallback is slower than W8A8 and less accurate).

A device file may start from another one with a Hydra-style defaults list, `defaults: [sd835, _self_]`,
and override fields (e.g. `threads: 4`); the same files serve as the Hydra config group `device`.
Adding a device is one YAML file; adding a kind of device is one `register_device_type` call.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping


from ..blocks import KernelSpec
from ..errors import ConfigError
from ..io import check_name, data_dir, read_yaml

DEVICES_DIR = data_dir("conf") / "device"


class DeviceModel:
    """Prices fused kernels on one device. Analytic models implement `kernel_ms` for the bits the hardware
    computes at; `op_ms` prices a bit pair as the device's runtime executes it (`bits` of the device file)."""

    analytic: bool = True
    bit_support: "BitSupport"
    qdq_ns_per_elem: float = 1.0   # fp32 fallback: one quantize or dequantize of one element

    def kernel_ms(self, k: KernelSpec, w_bits: int, a_bits: int) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def runtime_kernel_ms(self, k: KernelSpec, w_bits: int, a_bits: int) -> float:
        mode = self.bit_support.mode(w_bits, a_bits)
        if mode == "int8":
            return self.kernel_ms(k, 8, 8)
        if mode == "fp32_fallback":
            qdq = (k.in_elems + k.out_elems + k.weight_count) * self.qdq_ns_per_elem * 1e-6 if k.quantized else 0.0
            return self.kernel_ms(k, 32, 32) + qdq
        return self.kernel_ms(k, w_bits, a_bits)

    def op_ms(self, kernels: list[KernelSpec], w_bits: int, a_bits: int) -> float:
        return float(sum(self.runtime_kernel_ms(k, w_bits, a_bits) for k in kernels))


@dataclass(frozen=True)
class DeviceType:
    name: str
    params: type            # a dataclass; every field is a required, positive number unless it has a default
    make: Callable[["Device"], DeviceModel]
    analytic: bool
    doc: str = ""


_TYPES: dict[str, DeviceType] = {}


def register_device_type(name: str, params: type, make: Callable[["Device"], DeviceModel], analytic: bool,
                         doc: str = "") -> DeviceType:
    if name in _TYPES:
        raise ValueError(f"device type {name!r} registered twice")
    _TYPES[name] = DeviceType(name, params, make, analytic, doc)
    return _TYPES[name]


def device_types() -> list[str]:
    _ensure_types()
    return sorted(_TYPES)


def _ensure_types() -> None:
    from . import analytic, measured, measured_int8  # noqa: F401  (register the built-in device types)


BIT_MODES = ("native", "int8", "fp32_fallback", "unsupported")
SEARCHABLE_BIT_MODES = ("native", "int8")
_PAIR_RE = re.compile(r"^w(\d+)a(\d+)$")


@dataclass(frozen=True)
class BitSupport:
    """How a runtime executes each (w_bits, a_bits) pair: `modes` for named pairs, `default` for the rest."""
    modes: tuple[tuple[tuple[int, int], str], ...] = ()
    default: str = "native"

    @cached_property
    def _by_pair(self) -> dict[tuple[int, int], str]:
        return dict(self.modes)

    def mode(self, w_bits: int, a_bits: int) -> str:
        if max(w_bits, a_bits) > 8:
            return "native"  # float
        return self._by_pair.get((w_bits, a_bits), self.default)

    def searchable(self, w_bits: int, a_bits: int) -> bool:
        return self.mode(w_bits, a_bits) in SEARCHABLE_BIT_MODES

    def to_dict(self) -> dict[str, str]:
        return {**{f"w{w}a{a}": m for (w, a), m in self.modes}, "default": self.default}


@dataclass(frozen=True)
class Device:
    name: str
    type: str
    description: str
    threads: int
    params: Any                 # the type's parameter dataclass instance
    source: str = ""
    raw: dict = field(default_factory=dict, compare=False)
    bits: BitSupport = BitSupport()

    @property
    def analytic(self) -> bool:
        return _TYPES[self.type].analytic

    def model(self) -> DeviceModel:
        return _TYPES[self.type].make(self)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "type": self.type, "description": self.description, "threads": self.threads,
               "params": dataclasses.asdict(self.params)}
        if self.bits != BitSupport():
            out["bits"] = self.bits.to_dict()
        return out

    def search_bits(self, w_bits: tuple[int, ...], a_bits: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The weight and activation bit choices of a space that the search may offer on this device: the pairs
        its runtime runs (`native` or `int8`). The search samples weight and activation bits independently, so
        the pairs must form a product set; otherwise, or when none is left, a one-line error."""
        ok = {(w, a) for w in w_bits for a in a_bits if self.bits.searchable(w, a)}
        ws = tuple(sorted({w for w, _ in ok}))
        as_ = tuple(sorted({a for _, a in ok}))
        if not ok:
            raise ConfigError(f"{self.source}: field 'bits': device {self.name!r} runs none of the space's bit pairs "
                              f"(weights {list(w_bits)}, activations {list(a_bits)}) natively or on int8 kernels; "
                              f"add a pair it runs (e.g. 8-bit) to the space's bits")
        missing = sorted({(w, a) for w in ws for a in as_} - ok)
        if missing:
            raise ConfigError(f"{self.source}: field 'bits': the pairs device {self.name!r} runs are not a product "
                              f"of weight and activation choices (no {', '.join(f'w{w}a{a}' for w, a in missing)}); "
                              f"the search samples weight and activation bits independently")
        return ws, as_

    def search_space(self, space: Any) -> Any:
        """`space` with the bit choices this device's runtime runs (search_bits); the others are never offered."""
        return space.with_bits(*self.search_bits(space.w_bits, space.a_bits))


# ---------------------------------------------------------------------------------------------- loading

def known_devices() -> list[str]:
    return sorted(p.stem for p in DEVICES_DIR.glob("*.yaml"))


def device_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return DEVICES_DIR / f"{check_name(str(name_or_path), 'field device')}.yaml"


def load_device(spec: "str | Path | Mapping | Device") -> Device:
    """A device by name (conf/device/<name>.yaml), by path to a YAML file, or from a mapping (a Hydra
    `device` group node). Errors are one line naming the file and field."""
    if isinstance(spec, Device):
        return spec
    if isinstance(spec, Mapping) or hasattr(spec, "items"):
        raw = _to_plain(spec)
        name = raw.get("name", "<device>") if isinstance(raw, dict) else "<device>"
        source = str(device_path(name)) if isinstance(name, str) else "<device>"
        if isinstance(raw, dict):
            raw = {k: v for k, v in raw.items() if k != "defaults"}  # Hydra has already merged them
        return device_from_dict(raw, source)
    path = device_path(spec)
    if not path.is_file():
        if Path(spec).suffix in (".yaml", ".yml"):
            raise ConfigError(f"{path}: device file not found")
        raise ConfigError(f"unknown device {str(spec)!r}; known devices: {', '.join(known_devices())} "
                          f"(or give a path to a device .yaml file)")
    return device_from_dict(_read_with_defaults(path, set()), str(path))


def _to_plain(node: Any) -> Any:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(node)


def _read_yaml(path: Path) -> dict:
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a device file must be a YAML mapping")
    return raw


def _read_with_defaults(path: Path, seen: set) -> dict:
    """Read a device YAML, merging the files its `defaults` list names (Hydra semantics, `_self_` last)."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: field 'defaults' forms a cycle")
    seen = seen | {path.resolve()}
    raw = _read_yaml(path)
    defaults = raw.pop("defaults", [])
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: field 'defaults' must be a list like [sd835, _self_]")
    merged: dict = {}
    self_done = False
    for d in defaults:
        if d == "_self_":
            merged = _merge(merged, raw)
            self_done = True
            continue
        if not isinstance(d, str):
            raise ConfigError(f"{path}: field 'defaults' entries must be device names, got {d!r}")
        base = path.parent / f"{d}.yaml"  # a sibling file, else the shipped device of that name (Hydra's group)
        if not base.is_file() and d in known_devices():
            base = device_path(d)
        if not base.is_file():
            raise ConfigError(f"{path}: field 'defaults' names unknown device {d!r}; known: {', '.join(known_devices())}")
        merged = _merge(merged, _read_with_defaults(base, seen))
    return merged if self_done else _merge(merged, raw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def device_from_dict(raw: Any, source: str = "<device>") -> Device:
    _ensure_types()

    def err(field_name: str, msg: str) -> ConfigError:
        return ConfigError(f"{source}: field '{field_name}' {msg}")

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a device must be a mapping")
    allowed = {"name", "type", "description", "threads", "params", "bits"}
    extra = sorted(set(raw) - allowed, key=str)
    if extra:
        raise err(str(extra[0]), f"is not known here; allowed: {', '.join(sorted(allowed))}")
    name = check_name(raw.get("name"), f"{source}: field 'name'")
    dtype = raw.get("type")
    if not isinstance(dtype, str) or dtype not in _TYPES:
        raise err("type", f"names unknown device type {dtype!r}; known types: {', '.join(sorted(_TYPES))}")
    threads = raw.get("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise err("threads", f"must be a positive integer, got {threads!r}")
    params_raw = raw.get("params", {})
    if not isinstance(params_raw, dict):
        raise err("params", "must be a mapping of the device type's parameters")
    params = _parse_params(_TYPES[dtype].params, params_raw, err)
    return Device(name=name, type=dtype, description=str(raw.get("description", "")), threads=threads,
                  params=params, source=source, raw=raw, bits=_parse_bits(raw.get("bits"), err))


def _parse_bits(raw: Any, err) -> BitSupport:
    if raw is None:
        return BitSupport()
    if not isinstance(raw, dict):
        raise err("bits", "must be a mapping like {w8a8: int8, default: fp32_fallback}")
    modes, default = [], "native"
    for key, mode in raw.items():
        if mode not in BIT_MODES:
            raise err(f"bits.{key}", f"must be one of {', '.join(BIT_MODES)}, got {mode!r}")
        if key == "default":
            default = mode
            continue
        m = _PAIR_RE.match(str(key))
        if not m or not (1 <= int(m[1]) <= 8 and 1 <= int(m[2]) <= 8):
            raise err(f"bits.{key}", "must be a bit pair like w8a8 (1-8 bits each) or 'default'")
        modes.append(((int(m[1]), int(m[2])), mode))
    return BitSupport(tuple(sorted(modes)), default)


def _parse_params(cls: type, raw: dict, err) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = sorted(set(raw) - set(fields))
    if extra:
        raise err(f"params.{extra[0]}", f"is not a parameter of this device type; known: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if name not in raw:
            if has_default:
                continue
            raise err(f"params.{name}", "is missing; every parameter of this device type is required")
        val = raw[name]
        if f.type in ("str", str) or isinstance(f.default, str):
            if not isinstance(val, str) or not val:
                raise err(f"params.{name}", f"must be a non-empty string, got {val!r}")
        elif f.type in ("bool", bool):
            if not isinstance(val, bool):
                raise err(f"params.{name}", f"must be true or false, got {val!r}")
        else:
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val <= 0:
                raise err(f"params.{name}", f"must be a positive number, got {val!r}")
            if f.type in ("int", int) and not isinstance(val, int):
                raise err(f"params.{name}", f"must be a positive integer, got {val!r}")
        values[name] = val
    return cls(**values)


def describe_devices() -> list[tuple[str, str]]:
    out = []
    for name in known_devices():
        try:
            out.append((name, load_device(name).description))
        except ConfigError as exc:
            out.append((name, f"(invalid: {exc})"))
    return out


@dataclass(frozen=True)
class ImportedParams:
    """A device whose table comes from `fbnas lut import` (timed elsewhere); nothing to configure."""


class ImportedDevice(DeviceModel):
    analytic = False

    def __init__(self, device: Device):
        self.device = device

    def build_table(self, space, signatures, device, **_):
        raise ConfigError(f"{device.source}: device {device.name!r} is of type 'imported': its table comes from "
                          f"timing `fbnas lut export-ops space={space.name}` on the device and "
                          f"`fbnas lut import space={space.name} device={device.name} csv=<measurements.csv>`")


register_device_type("imported", ImportedParams, ImportedDevice, analytic=False,
                     doc="a device timed elsewhere; its table is imported from a CSV")

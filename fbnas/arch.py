"""Arch: a found architecture as data (fbnas-arch/1 JSON). It rebuilds the exact network.

One record per searchable layer {op, c_in, channels, stride, w_bits, a_bits}; fixed parts (stem, head,
classifier) with their own bits; predicted cost per device; provenance.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from .blocks import KernelSpec, get_op, is_known_op, known_ops, op_kernels
from .blocks.kernels import conv
from .errors import ConfigError
from .io import atomic_write_json, read_json
from .space import MAX_BITS, MAX_CHANNELS, MAX_CLASSES, MAX_IN_CHANNELS, MAX_INPUT_SIZE, MIN_BITS, SearchSpace, conv_out_size

ARCH_FORMAT = "fbnas-arch/1"


@dataclass(frozen=True)
class LayerChoice:
    op: str
    c_in: int
    channels: int
    stride: int
    w_bits: int
    a_bits: int


@dataclass(frozen=True)
class Arch:
    space: str
    in_channels: int
    input_size: int
    num_classes: int
    stem_channels: int
    stem_stride: int
    stem_kernel: int
    layers: tuple[LayerChoice, ...]
    head_channels: int
    fixed_w_bits: int = 8
    fixed_a_bits: int = 8
    predicted: dict = field(default_factory=dict, compare=False)
    provenance: dict = field(default_factory=dict, compare=False)
    # what the deployed model expects: layout, mean/std, class names (fbnas.data.DataBundle.preprocessing)
    preprocessing: dict = field(default_factory=dict, compare=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_space(cls, space: SearchSpace, ops: Sequence[str], w_bits: Sequence[int] | int,
                   a_bits: Sequence[int] | int) -> "Arch":
        shapes = space.layers()
        if len(ops) != len(shapes):
            raise ConfigError(f"space {space.name} has {len(shapes)} searchable layers, got {len(ops)} ops")
        n = len(shapes)
        wb = [w_bits] * n if isinstance(w_bits, int) else list(w_bits)
        ab = [a_bits] * n if isinstance(a_bits, int) else list(a_bits)
        layers = tuple(LayerChoice(op, s.c_in, s.c_out, s.stride, int(w), int(a))
                       for op, s, w, a in zip(ops, shapes, wb, ab))
        return cls(space=space.name, in_channels=space.in_channels, input_size=space.input_size,
                   num_classes=space.num_classes, stem_channels=space.stem_channels,
                   stem_stride=space.stem_stride, stem_kernel=space.stem_kernel, layers=layers,
                   head_channels=space.head_channels, fixed_w_bits=space.fixed_w_bits,
                   fixed_a_bits=space.fixed_a_bits)

    def with_bits(self, w_bits: Sequence[int] | int, a_bits: Sequence[int] | int | None = None) -> "Arch":
        n = len(self.layers)
        wb = [w_bits] * n if isinstance(w_bits, int) else list(w_bits)
        ab = [l.a_bits for l in self.layers] if a_bits is None else ([a_bits] * n if isinstance(a_bits, int)
                                                                       else list(a_bits))
        layers = tuple(replace(l, w_bits=int(w), a_bits=int(a)) for l, w, a in zip(self.layers, wb, ab))
        return replace(self, layers=layers, predicted={})

    # ------------------------------------------------------------------ shapes and costs
    def layer_sizes(self) -> list[int]:
        """Input spatial size of each searchable layer."""
        size = conv_out_size(self.input_size, self.stem_stride)
        out = []
        for l in self.layers:
            out.append(size)
            size = conv_out_size(size, l.stride)
        return out

    @property
    def final_size(self) -> int:
        size = conv_out_size(self.input_size, self.stem_stride)
        for l in self.layers:
            size = conv_out_size(size, l.stride)
        return size

    def parts(self) -> list[tuple[str, list[KernelSpec], int, int]]:
        """(part name, fused kernels, w_bits, a_bits) for every part of the network, in order."""
        fb_w, fb_a = self.fixed_w_bits, self.fixed_a_bits
        out = [("stem", stem_kernels(self.in_channels, self.stem_channels, self.input_size, self.stem_kernel,
                                     self.stem_stride), fb_w, fb_a)]
        for i, (l, size) in enumerate(zip(self.layers, self.layer_sizes())):
            out.append((f"layers.{i}", op_kernels(l.op, l.c_in, l.channels, l.stride, size, size), l.w_bits,
                        l.a_bits))
        c_last = self.layers[-1].channels if self.layers else self.stem_channels
        out += [(name, ks, fb_w, fb_a) for name, ks in
                head_kernels(c_last, self.head_channels, self.final_size, self.num_classes)]
        return out

    def size_kb(self) -> float:
        """Weight storage at each layer's bits (BN folded; 32-bit biases of convs and classifier)."""
        bits = 0.0
        for _, ks, wb, _ in self.parts():
            for k in ks:
                if k.has_weights:
                    bits += k.weight_count * wb + k.c_out * 32
        return bits / 8 / 1024

    def bops(self) -> float:
        """Bit-operations: MACs x w_bits x a_bits summed over every kernel."""
        return float(sum(k.macs * wb * ab for _, ks, wb, ab in self.parts() for k in ks))

    def macs(self) -> int:
        return sum(k.macs for _, ks, _, _ in self.parts() for k in ks)

    def params(self) -> int:
        return sum(k.params for _, ks, _, _ in self.parts() for k in ks)

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ARCH_FORMAT,
            "space": self.space,
            "input": {"channels": self.in_channels, "size": self.input_size},
            "num_classes": self.num_classes,
            "stem": {"kernel": self.stem_kernel, "channels": self.stem_channels, "stride": self.stem_stride},
            "layers": [{"op": l.op, "c_in": l.c_in, "channels": l.channels, "stride": l.stride,
                        "w_bits": l.w_bits, "a_bits": l.a_bits} for l in self.layers],
            "head": {"channels": self.head_channels},
            "fixed_bits": {"weights": self.fixed_w_bits, "activations": self.fixed_a_bits},
            "preprocessing": self.preprocessing,
            "predicted": self.predicted,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    def summary(self) -> str:
        rows = [f"{i:>3} {l.op:<14} {l.c_in:>4}->{l.channels:<4} s{l.stride} w{l.w_bits} a{l.a_bits}"
                for i, l in enumerate(self.layers)]
        return "\n".join(rows)


def stem_kernels(c_in: int, c_out: int, size: int, kernel: int, stride: int) -> list[KernelSpec]:
    return [conv("conv", c_in, c_out, size, size, kernel, stride)]


def head_kernels(c_in: int, head: int, size: int, num_classes: int) -> list[tuple[str, list[KernelSpec]]]:
    return [("head", [conv("pw", c_in, head, size, size)]),
            ("pool", [KernelSpec("pool", head, head, size, size, quantized=False)]),
            ("classifier", [KernelSpec("linear", head, num_classes, 1, 1)])]


# ---------------------------------------------------------------------------------------------- loading

def load_arch(path: str | Path) -> Arch:
    raw = read_json(path, "architecture file not found")
    return arch_from_dict(raw, str(path))


SIZE_LIMITS = {"channels": MAX_CHANNELS, "num_classes": MAX_CLASSES, "input.channels": MAX_IN_CHANNELS,
               "input.size": MAX_INPUT_SIZE}


def arch_from_dict(raw: Any, source: str = "<dict>") -> Arch:
    def err(field_name: str, msg: str) -> ConfigError:
        return ConfigError(f"{source}: field '{field_name}' {msg}")

    def pos_int(d: Any, key: str, where: str) -> int:
        val = d.get(key) if isinstance(d, dict) else None
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise err(f"{where}{key}", f"must be a positive integer, got {val!r}")
        limit = SIZE_LIMITS.get(key if where != "input." else f"input.{key}")
        if limit is not None and val > limit:
            raise err(f"{where}{key}", f"is {val}; at most {limit} (a size limit of fbnas spaces)")
        return val

    def bits(d: Any, key: str, where: str) -> int:
        val = d.get(key) if isinstance(d, dict) else None
        if isinstance(val, bool) or not isinstance(val, int) or not MIN_BITS <= val <= MAX_BITS:
            raise err(f"{where}{key}", f"has bit-width {val!r}; bit-widths must be integers in {MIN_BITS}..{MAX_BITS}")
        return val

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: an architecture must be a JSON object")
    if raw.get("format") != ARCH_FORMAT:
        raise err("format", f"is {raw.get('format')!r}; expected {ARCH_FORMAT!r}")
    layers_raw = raw.get("layers")
    if not isinstance(layers_raw, list) or not layers_raw:
        raise err("layers", "must be a non-empty list")
    inp, stem, head = raw.get("input", {}), raw.get("stem", {}), raw.get("head", {})
    fixed = raw.get("fixed_bits", {"weights": 8, "activations": 8})
    for name in ("input", "stem", "head", "fixed_bits", "predicted", "provenance"):
        if not isinstance(raw.get(name, {}), dict):
            raise err(name, f"must be an object, got {type(raw.get(name)).__name__}")
    layers = []
    c_prev = pos_int(stem, "channels", "stem.")
    for i, l in enumerate(layers_raw):
        where = f"layers[{i}]."
        if not isinstance(l, dict):
            raise err(f"layers[{i}]", "must be an object {op, c_in, channels, stride, w_bits, a_bits}")
        op = l.get("op")
        if not isinstance(op, str) or not is_known_op(op):
            raise err(f"{where}op", f"names unknown op {op!r}; known ops: {', '.join(known_ops())}")
        c_in = l.get("c_in", c_prev)
        if c_in != c_prev:
            raise err(f"{where}c_in", f"is {c_in} but the previous layer gives {c_prev} channels")
        stride = l.get("stride")
        if stride not in (1, 2):
            raise err(f"{where}stride", f"must be 1 or 2, got {stride!r}")
        ch = pos_int(l, "channels", where)
        problem = get_op(op).check(c_prev, ch, stride)
        if problem:
            raise err(f"{where}op", f"{op} cannot map {c_prev}->{ch} at stride {stride}: {problem}")
        layers.append(LayerChoice(op, c_prev, ch, stride, bits(l, "w_bits", where), bits(l, "a_bits", where)))
        c_prev = ch
    return Arch(
        space=str(raw.get("space", "")),
        in_channels=pos_int(inp, "channels", "input."),
        input_size=pos_int(inp, "size", "input."),
        num_classes=pos_int(raw, "num_classes", ""),
        stem_channels=pos_int(stem, "channels", "stem."),
        stem_stride=stem.get("stride", 1) if stem.get("stride", 1) in (1, 2) else pos_int({}, "stride", "stem."),
        stem_kernel=pos_int(stem, "kernel", "stem.") if "kernel" in stem else 3,
        layers=tuple(layers),
        head_channels=pos_int(head, "channels", "head."),
        fixed_w_bits=bits(fixed, "weights", "fixed_bits."),
        fixed_a_bits=bits(fixed, "activations", "fixed_bits."),
        predicted=dict(raw.get("predicted") or {}),
        provenance=dict(raw.get("provenance") or {}),
        preprocessing=_preprocessing(raw.get("preprocessing"), raw["num_classes"], source),
    )


def _preprocessing(raw: Any, num_classes: int, source: str) -> dict:
    if raw is None:
        return {}
    classes = raw.get("classes") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or (classes is not None and not (
            isinstance(classes, list) and len(classes) == num_classes and all(isinstance(c, str) for c in classes))):
        raise ConfigError(f"{source}: field 'preprocessing' must be an object whose 'classes' lists the "
                          f"{num_classes} class names")
    return dict(raw)


def arch_records(archs: Iterable[Arch]) -> list[dict]:
    return [a.to_dict() for a in archs]

"""SearchSpace: a macro-architecture with searchable layers, loaded and validated from YAML.

A space names its input, a fixed stem, stages of searchable layers (channels, repeats, stride of the
first layer), a fixed head, the candidate ops (keys of the block registry) and the bit choices. Every
error names the file and the field.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from .blocks.kernels import conv_out_size
from .blocks.registry import check_op_shape
from .errors import ConfigError
from .io import check_name, data_dir, read_yaml

SPACE_FORMAT = "fbnas-space/1"
DERIVED_NAME = re.compile(r"^(?P<base>[\w.-]+)_(?P<c>\d+)x(?P<s>\d+)_(?P<n>\d+)cls$")
SPACES_DIR = data_dir("search_spaces")
MIN_BITS, MAX_BITS = 1, 8


@dataclass(frozen=True)
class Stage:
    channels: int
    repeats: int
    stride: int


@dataclass(frozen=True)
class LayerShape:
    """One searchable layer position: everything about its shape that a candidate op needs."""

    index: int
    stage: int
    c_in: int
    c_out: int
    stride: int
    h_in: int
    w_in: int

    @property
    def h_out(self) -> int:
        return conv_out_size(self.h_in, self.stride)

    @property
    def w_out(self) -> int:
        return conv_out_size(self.w_in, self.stride)


@dataclass(frozen=True)
class SearchSpace:
    name: str
    in_channels: int
    input_size: int
    num_classes: int
    stem_channels: int
    stem_stride: int
    stem_kernel: int
    stages: tuple[Stage, ...]
    head_channels: int
    candidates: tuple[str, ...]
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]
    fixed_w_bits: int = 8
    fixed_a_bits: int = 8
    description: str = ""
    dataset: str = field(default="", compare=False)  # the dataset it is made for (fbnas.data.DATASETS), "" if none
    source: str = field(default="", compare=False)

    def layers(self) -> list[LayerShape]:
        out: list[LayerShape] = []
        c_in = self.stem_channels
        size = conv_out_size(self.input_size, self.stem_stride)
        for s_idx, stage in enumerate(self.stages):
            for r in range(stage.repeats):
                stride = stage.stride if r == 0 else 1
                out.append(LayerShape(len(out), s_idx, c_in, stage.channels, stride, size, size))
                size = conv_out_size(size, stride)
                c_in = stage.channels
        return out

    def with_bits(self, w_bits: tuple[int, ...], a_bits: tuple[int, ...]) -> "SearchSpace":
        """The same space with fewer bit choices (those a device's runtime runs)."""
        return replace(self, w_bits=tuple(w_bits), a_bits=tuple(a_bits))

    @property
    def num_layers(self) -> int:
        return sum(s.repeats for s in self.stages)

    @property
    def final_size(self) -> int:
        layers = self.layers()
        return layers[-1].h_out if layers else conv_out_size(self.input_size, self.stem_stride)

    @property
    def last_stage_channels(self) -> int:
        return self.stages[-1].channels if self.stages else self.stem_channels

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPACE_FORMAT,
            "name": self.name,
            "description": self.description,
            **({"dataset": self.dataset} if self.dataset else {}),
            "input": {"channels": self.in_channels, "size": self.input_size},
            "num_classes": self.num_classes,
            "stem": {"op": "conv", "kernel": self.stem_kernel, "channels": self.stem_channels,
                     "stride": self.stem_stride},
            "stages": [{"channels": s.channels, "repeats": s.repeats, "stride": s.stride} for s in self.stages],
            "head": {"channels": self.head_channels},
            "candidates": list(self.candidates),
            "bits": {"weights": list(self.w_bits), "activations": list(self.a_bits)},
            "fixed_bits": {"weights": self.fixed_w_bits, "activations": self.fixed_a_bits},
        }


def override_io(space: SearchSpace, in_channels: int | None = None, input_size: int | None = None,
                num_classes: int | None = None) -> SearchSpace:
    """The space with another input (channels, size) or number of classes; everything else as it is. A changed
    space gets its own name (fmnist -> fmnist_3x32_5cls), so it never picks up the original's latency tables."""
    changes = {k: v for k, v in (("in_channels", in_channels), ("input_size", input_size),
                                 ("num_classes", num_classes)) if v is not None and v != getattr(space, k)}
    for key, val in changes.items():
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ConfigError(f"field 'space_override.{key}' must be a positive integer, got {val!r}")
    if not changes:
        return space
    new = replace(space, **changes)
    new = replace(new, name=f"{space.name}_{new.in_channels}x{new.input_size}_{new.num_classes}cls",
                  description=f"{space.name} with input {new.in_channels}x{new.input_size}x{new.input_size} and "
                              f"{new.num_classes} classes. {space.description}".strip(), dataset="", source="")
    return space_from_dict(new.to_dict(), f"space {space.name} with {changes}")  # validated like a file


# ---------------------------------------------------------------------------------------------- loading

# size limits, checked before anything is allocated (the largest shipped space, fbnet: 1984 channels, 22 layers, 224 px)
MAX_CHANNELS, MAX_REPEATS, MAX_LAYERS = 4096, 32, 128
MAX_IN_CHANNELS, MAX_INPUT_SIZE, MAX_CLASSES = 16, 1024, 50000


def space_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return SPACES_DIR / f"{check_name(str(name_or_path), 'field space')}.yaml"


def save_space(space: SearchSpace, path: str | Path) -> None:
    """Write a space as YAML that load_space reads back (e.g. `fbnas lut build space=<run>/space.yaml`)."""
    import yaml

    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(space.to_dict(), sort_keys=False))


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load a space by name (search_spaces/<name>.yaml), by the name of a derived space (<space>_<C>x<S>_<N>cls,
    see override_io) or by path; raise ConfigError naming file and field."""
    path = space_path(name_or_path)
    derived = DERIVED_NAME.match(str(name_or_path))
    if not path.is_file() and derived and space_path(derived["base"]).is_file():
        return override_io(load_space(derived["base"]), int(derived["c"]), int(derived["s"]), int(derived["n"]))
    if not path.is_file():
        raise ConfigError(
            f"{path}: search space not found; known spaces: {', '.join(available_spaces())} "
            "(or give a path to a .yaml file)")
    return space_from_dict(read_yaml(path), str(path))


def space_from_dict(raw: Any, source: str = "<dict>") -> SearchSpace:
    v = _Validator(source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a search space must be a YAML mapping, got {type(raw).__name__}")
    v.only_keys(raw, "", {"format", "name", "description", "dataset", "input", "num_classes", "stem", "stages",
                          "head", "candidates", "bits", "fixed_bits"})
    fmt = raw.get("format", SPACE_FORMAT)
    if fmt != SPACE_FORMAT:
        raise ConfigError(f"{source}: field 'format' is {fmt!r}; this fbnas reads {SPACE_FORMAT!r}")
    name = check_name(v.string(raw, "name"), f"{source}: field 'name'")
    inp = v.mapping(raw, "input")
    v.only_keys(inp, "input", {"channels", "size"})
    stem = v.mapping(raw, "stem")
    v.only_keys(stem, "stem", {"op", "kernel", "channels", "stride"})
    if stem.get("op", "conv") != "conv":
        raise ConfigError(f"{source}: field 'stem.op' must be 'conv' (a kxk conv+BN+ReLU), got {stem.get('op')!r}")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{source}: field 'stages' must be a non-empty list of {{channels, repeats, stride}}")
    stages = []
    for i, st in enumerate(stages_raw):
        where = f"stages[{i}]"
        if not isinstance(st, dict):
            raise ConfigError(f"{source}: field '{where}' must be a mapping {{channels, repeats, stride}}")
        v.only_keys(st, where, {"channels", "repeats", "stride"})
        stages.append(Stage(v.pos_int(st, "channels", where, MAX_CHANNELS), v.pos_int(st, "repeats", where, MAX_REPEATS),
                            v.choice(st, "stride", where, (1, 2))))
    if sum(st.repeats for st in stages) > MAX_LAYERS:
        raise ConfigError(f"{source}: field 'stages' has {sum(st.repeats for st in stages)} layers in all; at most "
                          f"{MAX_LAYERS} (a size limit of fbnas spaces)")
    head = v.mapping(raw, "head")
    v.only_keys(head, "head", {"channels"})
    candidates = raw.get("candidates")
    if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) for c in candidates):
        raise ConfigError(f"{source}: field 'candidates' must be a non-empty list of op names")
    from .blocks import known_ops, is_known_op  # late import: blocks import nothing from space

    for i, op in enumerate(candidates):
        if not is_known_op(op):
            raise ConfigError(
                f"{source}: field 'candidates[{i}]' names unknown op {op!r}; known ops: {', '.join(known_ops())}")
    if len(set(candidates)) != len(candidates):
        raise ConfigError(f"{source}: field 'candidates' lists an op twice")
    bits = v.mapping(raw, "bits")
    v.only_keys(bits, "bits", {"weights", "activations"})
    fixed = raw.get("fixed_bits", {"weights": 8, "activations": 8})
    if not isinstance(fixed, dict):
        raise ConfigError(f"{source}: field 'fixed_bits' must be a mapping {{weights, activations}}")
    v.only_keys(fixed, "fixed_bits", {"weights", "activations"})
    space = SearchSpace(
        name=name,
        description=str(raw.get("description", "")),
        dataset=_dataset_field(raw, source),
        in_channels=v.pos_int(inp, "channels", "input", MAX_IN_CHANNELS),
        input_size=v.pos_int(inp, "size", "input", MAX_INPUT_SIZE),
        num_classes=v.pos_int(raw, "num_classes", "", MAX_CLASSES),
        stem_channels=v.pos_int(stem, "channels", "stem", MAX_CHANNELS),
        stem_stride=v.choice(stem, "stride", "stem", (1, 2)),
        stem_kernel=v.choice(stem, "kernel", "stem", (1, 3, 5, 7), default=3),
        stages=tuple(stages),
        head_channels=v.pos_int(head, "channels", "head", MAX_CHANNELS),
        candidates=tuple(candidates),
        w_bits=v.bit_list(bits, "weights", "bits"),
        a_bits=v.bit_list(bits, "activations", "bits"),
        fixed_w_bits=v.one_bits(fixed, "weights", "fixed_bits"),
        fixed_a_bits=v.one_bits(fixed, "activations", "fixed_bits"),
        source=source,
    )
    _check_candidate_shapes(space)
    return space


def _dataset_field(raw: dict, source: str) -> str:
    from .data import DATASETS  # late import: fbnas.data imports torch, which `fbnas list` need not load

    name = raw.get("dataset", "")
    if name != "" and name not in DATASETS:
        raise ConfigError(f"{source}: field 'dataset' is {name!r}; use one of {', '.join(DATASETS)} (or leave it out)")
    return name


def _check_candidate_shapes(space: SearchSpace) -> None:
    for layer in space.layers():
        for i, op in enumerate(space.candidates):
            problem = check_op_shape(op, layer.c_in, layer.c_out, layer.stride)
            if problem:
                raise ConfigError(f"{space.source}: field 'candidates[{i}]' ({op}) does not fit layer {layer.index} "
                                  f"({layer.c_in}->{layer.c_out}, stride {layer.stride}): {problem}")


class _Validator:
    def __init__(self, source: str):
        self.source = source

    def _err(self, field_name: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.source}: field '{field_name}' {msg}")

    @staticmethod
    def _join(parent: str, key: str) -> str:
        return f"{parent}.{key}" if parent else key

    def only_keys(self, d: dict, where: str, allowed: set[str]) -> None:
        extra = sorted(set(d) - allowed, key=str)
        if extra:
            raise self._err(self._join(where, str(extra[0])), f"is not known here; allowed: {', '.join(sorted(allowed))}")

    def string(self, d: dict, key: str) -> str:
        val = d.get(key)
        if not isinstance(val, str) or not val:
            raise self._err(key, "must be a non-empty string")
        return val

    def mapping(self, d: dict, key: str) -> dict:
        val = d.get(key)
        if not isinstance(val, dict):
            raise self._err(key, "is missing or not a mapping")
        return val

    def pos_int(self, d: dict, key: str, where: str, limit: Optional[int] = None) -> int:
        val = d.get(key)
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise self._err(self._join(where, key), f"must be a positive integer, got {val!r}")
        if limit is not None and val > limit:
            raise self._err(self._join(where, key), f"is {val}; at most {limit} (a size limit of fbnas spaces)")
        return val

    def choice(self, d: dict, key: str, where: str, allowed: tuple, default: Any = None) -> Any:
        val = d.get(key, default)
        if val not in allowed or isinstance(val, bool):
            raise self._err(self._join(where, key), f"must be one of {list(allowed)}, got {val!r}")
        return val

    def _check_bit(self, val: Any, field_name: str) -> int:
        if isinstance(val, bool) or not isinstance(val, int) or not MIN_BITS <= val <= MAX_BITS:
            raise self._err(field_name, f"has bit-width {val!r}; bit-widths must be integers in {MIN_BITS}..{MAX_BITS}")
        return val

    def bit_list(self, d: dict, key: str, where: str) -> tuple[int, ...]:
        val = d.get(key)
        name = self._join(where, key)
        if not isinstance(val, list) or not val:
            raise self._err(name, "must be a non-empty list of bit-widths, e.g. [2, 4, 8]")
        bits = [self._check_bit(b, name) for b in val]
        if len(set(bits)) != len(bits):
            raise self._err(name, "lists a bit-width twice")
        return tuple(sorted(bits))

    def one_bits(self, d: dict, key: str, where: str) -> int:
        return self._check_bit(d.get(key, 8), self._join(where, key))

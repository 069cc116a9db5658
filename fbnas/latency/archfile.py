"""Read a file of architectures for `fbnas lut predict`.

Accepted: one arch.json (fbnas-arch/1), or a text file whose lines are each either the path of an arch.json
(relative to the file) or the ops of the searchable layers, separated by spaces or commas, as op names or
indices into space.candidates, each optionally with bits as `op:w4a8`. Blank lines and `#` comments are
skipped. Ops without bits take the given default bits.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..arch import Arch, load_arch
from ..errors import ConfigError
from ..space import SearchSpace

_BITS_RE = re.compile(r"^w(\d+)a(\d+)$")


def read_archs(path: str | Path, space: SearchSpace, w_bits: int, a_bits: int) -> list[Arch]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: architectures file not found")
    if path.suffix == ".json":
        return [_of_space(load_arch(path), space, str(path))]
    archs = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    for n, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if text.endswith(".json"):
            p = Path(text)
            p = p if p.is_absolute() else path.parent / p
            archs.append(_of_space(load_arch(p), space, f"{path}: line {n} ({p})"))
            continue
        archs.append(ops_line(text, space, w_bits, a_bits, f"{path}: line {n}"))
    if not archs:
        raise ConfigError(f"{path}: no architectures in the file")
    return archs


def _of_space(arch: Arch, space: SearchSpace, where: str) -> Arch:
    if arch.space and arch.space != space.name:
        raise ConfigError(f"{where}: the architecture is of space {arch.space!r}, not {space.name!r}; pass "
                          f"space={arch.space} (and its device) to predict it")
    return arch


def ops_line(text: str, space: SearchSpace, w_bits: int, a_bits: int, where: str) -> Arch:
    tokens = [t for t in re.split(r"[,\s]+", text) if t]
    if len(tokens) != space.num_layers:
        raise ConfigError(f"{where}: {len(tokens)} ops given; space {space.name} has {space.num_layers} searchable layers")
    ops, wb, ab = [], [], []
    for i, tok in enumerate(tokens):
        name, _, bits = tok.partition(":")
        if name.isdigit():
            if int(name) >= len(space.candidates):
                raise ConfigError(f"{where}: layer {i}: op index {name} is out of range 0..{len(space.candidates) - 1}")
            name = space.candidates[int(name)]
        elif name not in space.candidates:
            raise ConfigError(f"{where}: layer {i}: op {name!r} is not a candidate of space {space.name} "
                              f"({', '.join(space.candidates)})")
        w, a = w_bits, a_bits
        if bits:
            m = _BITS_RE.match(bits)
            if not m:
                raise ConfigError(f"{where}: layer {i}: bits {bits!r} must look like w4a8")
            w, a = int(m[1]), int(m[2])
        if w not in space.w_bits or a not in space.a_bits:
            raise ConfigError(f"{where}: layer {i}: bits w{w}a{a} are not choices of space {space.name} "
                              f"(weights {list(space.w_bits)}, activations {list(space.a_bits)})")
        ops.append(name)
        wb.append(w)
        ab.append(a)
    return Arch.from_space(space, ops, wb, ab)

"""Field descriptions of the typed configs, for `fbnas <command> --help`. One source: the comment after each field
of a config dataclass (`epochs: int = 6  # epochs of the search`), continued by comment-only lines right below it.
Parsed once per class from its source; no Hydra, no torch."""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from functools import lru_cache
from typing import Any, Iterator, Optional

_FIELD = re.compile(r"^    ([A-Za-z_]\w*)\s*:")
_CONTINUATION = re.compile(r"^    #")


@lru_cache(maxsize=None)
def _own_descriptions(cls: type) -> dict[str, str]:
    """The descriptions of the fields `cls` itself declares (not those of its bases)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen build): no descriptions
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(src).readline) if tok.type == tokenize.COMMENT}
    out: dict[str, list[str]] = {}
    current: Optional[str] = None
    for lineno, line in enumerate(src.splitlines(), start=1):
        m = _FIELD.match(line)
        if m and m.group(1) in cls.__dict__.get("__annotations__", {}):
            current = m.group(1)
            out[current] = [comments[lineno]] if lineno in comments else []
        elif current is not None and _CONTINUATION.match(line) and lineno in comments:
            out[current].append(comments[lineno])
        else:
            current = None
    return {name: " ".join(parts) for name, parts in out.items() if parts}


def descriptions(cls: type) -> dict[str, str]:
    """Field name -> one-line description, for every field of dataclass `cls` (inherited fields included);
    a field without a comment is left out."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_descriptions(klass))
    return out


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: shown as written
        return {}


def nested_configs(cls: type) -> Iterator[type]:
    """`cls` and every dataclass reachable through its fields."""
    yield cls
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        sub = hints.get(f.name)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            yield from nested_configs(sub)


def _type_name(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    t = re.sub(r"^Optional\[(.*)\]$", r"\1|null", t.replace("typing.", ""))
    return "any" if t == "Any" else t


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if value == "???":
        return "(required)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return '""' if value == "" else str(value)


def rows(cls: type, values: Any, groups: dict[str, list[str]], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, value, description) of every field of `cls`, nested configs flattened to dotted keys. `values`:
    the composed config as plain containers (the defaults a command starts from); `groups`: config-group name ->
    its choices (a group's value is shown by its name)."""
    desc, hints = descriptions(cls), _hints(cls)
    values = values if isinstance(values, dict) else {}
    out = []
    for f in dataclasses.fields(cls):
        key, text = prefix + f.name, desc.get(f.name, "")
        sub = hints.get(f.name)
        value = values.get(f.name, _default(f))
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            out.append((key + ".*", sub.__name__, "", text))
            out += rows(sub, value, groups, key + ".")
        elif key in groups:
            name = value.get("name", "") if isinstance(value, dict) else value
            out.append((key, "group", _show(name), f"{text}; choices: {', '.join(groups[key])}, or a YAML path"))
        else:
            out.append((key, _type_name(f), _show(value), text))
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return "???"


def format_rows(table: list[tuple[str, str, str, str]]) -> str:
    """One line per field: `key=value  type  description`."""
    left = [f"{k}={v}" if not k.endswith(".*") else k for k, _, v, _ in table]
    pad = min(max(len(s) for s in left), 40) + 2
    tpad = min(max(len(t) for _, t, _, _ in table), 14) + 2
    lines = []
    for s, (_, t, _, d) in zip(left, table):
        if len(s) >= pad:  # a long value: its own line, the type and description below it
            lines += [f"  {s}", f"  {'':<{pad}}{t:<{tpad}}{d}".rstrip()]
        else:
            lines.append(f"  {s:<{pad}}{t:<{tpad}}{d}".rstrip())
    return "\n".join(lines)

"""LatencyTable: the fbnas-lut/1 file. Canonical key -> {p50, p10, p90, n} in milliseconds, with provenance.

    {"format": "fbnas-lut/1", "device": "sd835", "space": "fmnist", "source": "analytic",
     "backend": {"name": "analytic_cpu", "versions": {"fbnas": "0.1.0"}}, "threads": 1, "unit": "ms",
     "created": "2025-01-01T00:00:00+00:00", "calibration": {...}, "device_config": {...},
     "entries": {"ir_k3_e6|32x32|16->24|s1|w4a8": {"p50": 0.41, "p10": 0.40, "p90": 0.43, "n": 200,
                                                   "macs": 1204224, "bytes": 23456.0}, ...}}

`n` is the number of timed runs behind an entry (0 for a model prediction); `macs` and `bytes` (at the
entry's bits) are optional and only used by `fbnas lut show`. A latency is >= 0: an identity op (`skip`
where shapes match) runs no kernel and costs 0.
"""
from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import LatencyTableError
from ..io import atomic_write_json, read_json
from .keys import parse_key

LUT_FORMAT = "fbnas-lut/1"
SOURCES = ("analytic", "measured", "imported")
MISSING_SHOWN = 5


@dataclass(frozen=True)
class Entry:
    p50: float
    p10: float
    p90: float
    n: int = 0
    macs: Optional[int] = None
    bytes: Optional[float] = None

    @classmethod
    def exact(cls, ms: float, macs: Optional[int] = None, nbytes: Optional[float] = None) -> "Entry":
        """A model prediction: one value, no spread, no runs."""
        return cls(ms, ms, ms, 0, macs, nbytes)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"p50": self.p50, "p10": self.p10, "p90": self.p90, "n": self.n}
        if self.macs is not None:
            d["macs"] = self.macs
        if self.bytes is not None:
            d["bytes"] = self.bytes
        return d


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class LatencyTable:
    device: str
    source: str
    entries: dict[str, Entry]
    backend: dict = field(default_factory=dict)
    threads: int = 1
    space: Optional[str] = None
    unit: str = "ms"
    created: str = field(default_factory=now_iso)
    calibration: dict = field(default_factory=dict)
    device_config: dict = field(default_factory=dict)
    path: Optional[str] = field(default=None, compare=False)  # where it was loaded from (for messages)

    # ------------------------------------------------------------------ lookups
    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, key: str) -> float:
        """p50 latency in ms of one key; LatencyTableError naming the key and how to fix it if absent."""
        entry = self.entries.get(key)
        if entry is None:
            raise self.missing_error([key])
        return entry.p50

    def lookup_many(self, keys: Iterable[str]) -> list[float]:
        keys = list(keys)
        self.require(keys)
        return [self.entries[k].p50 for k in keys]

    def missing(self, keys: Iterable[str]) -> list[str]:
        return sorted({k for k in keys if k not in self.entries})

    def require(self, keys: Iterable[str], space: Optional[str] = None) -> None:
        missing = self.missing(keys)
        if missing:
            raise self.missing_error(missing, space)

    def check(self, space) -> list[str]:
        """Keys the space can produce that this table lacks (sorted; empty when it covers the space)."""
        from .keys import space_keys

        return self.missing(space_keys(space))

    def missing_error(self, missing: list[str], space: Optional[str] = None) -> LatencyTableError:
        space = space or self.space or "<space>"
        shown = ", ".join(missing[:MISSING_SHOWN])
        more = f" (and {len(missing) - MISSING_SHOWN} more)" if len(missing) > MISSING_SHOWN else ""
        where = self.path or f"latency table for device {self.device}"
        return LatencyTableError(
            f"{where}: {len(missing)} key(s) missing: {shown}{more}; build a table that covers the space with "
            f"`fbnas lut build space={space} device={self.device}`")

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LUT_FORMAT,
            "device": self.device,
            "space": self.space,
            "source": self.source,
            "backend": self.backend,
            "threads": self.threads,
            "unit": self.unit,
            "created": self.created,
            "calibration": self.calibration,
            "device_config": self.device_config,
            "entries": {k: self.entries[k].to_dict() for k in sorted(self.entries)},
        }

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename): a failed write never leaves a half-written table."""
        atomic_write_json(path, self.to_dict())


# ---------------------------------------------------------------------------------------------- loading

def load_table(path: str | Path) -> LatencyTable:
    path = Path(path)
    raw = read_json(path, "latency table not found; build it with `fbnas lut build space=... device=...`",
                    LatencyTableError)
    table = table_from_dict(raw, str(path))
    table.path = str(path)
    return table


def table_from_dict(raw: Any, source: str = "<dict>") -> LatencyTable:
    def err(field_name: str, msg: str) -> LatencyTableError:
        return LatencyTableError(f"{source}: field '{field_name}' {msg}")

    if not isinstance(raw, dict):
        raise LatencyTableError(f"{source}: a latency table must be a JSON object")
    if raw.get("format") != LUT_FORMAT:
        raise err("format", f"is {raw.get('format')!r}; this fbnas reads {LUT_FORMAT!r}")
    device = raw.get("device")
    if not isinstance(device, str) or not device:
        raise err("device", "must be a non-empty string")
    src = raw.get("source")
    if src not in SOURCES:
        raise err("source", f"must be one of {list(SOURCES)}, got {src!r}")
    if raw.get("unit", "ms") != "ms":
        raise err("unit", f"must be 'ms', got {raw.get('unit')!r}")
    threads = raw.get("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise err("threads", f"must be a positive integer, got {threads!r}")
    for name in ("backend", "calibration", "device_config"):
        if not isinstance(raw.get(name, {}), dict):
            raise err(name, "must be an object")
    space = raw.get("space")
    if space is not None and not isinstance(space, str):
        raise err("space", "must be a string or null")
    entries_raw = raw.get("entries")
    if not isinstance(entries_raw, dict):
        raise err("entries", "must be an object mapping keys to {p50, p10, p90, n}")
    entries = {}
    for key, e in entries_raw.items():
        where = f"entries[{key!r}]"
        try:
            parse_key(key)
        except LatencyTableError as exc:
            raise err(where, f"has a bad key: {exc}") from None
        entries[key] = _entry(e, where, err)
    return LatencyTable(device=device, source=src, entries=entries, backend=raw.get("backend", {}),
                        threads=threads, space=space, created=str(raw.get("created", "")),
                        calibration=raw.get("calibration", {}), device_config=raw.get("device_config", {}))


def _non_negative(val: Any) -> bool:
    return not isinstance(val, bool) and isinstance(val, (int, float)) and math.isfinite(val) and val >= 0


def _entry(e: Any, where: str, err) -> Entry:
    if not isinstance(e, dict):
        raise err(where, "must be an object {p50, p10, p90, n}")
    p50 = e.get("p50")
    if not _non_negative(p50):
        raise err(f"{where}.p50", f"must be a non-negative number of ms, got {p50!r}")
    p10, p90 = e.get("p10", p50), e.get("p90", p50)
    for name, val in (("p10", p10), ("p90", p90)):
        if not _non_negative(val):
            raise err(f"{where}.{name}", f"must be a non-negative number of ms, got {val!r}")
    if not p10 <= p50 <= p90:
        raise err(where, f"needs p10 <= p50 <= p90, got {p10}, {p50}, {p90}")
    n = e.get("n", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise err(f"{where}.n", f"must be a non-negative integer (runs timed; 0 for a model), got {n!r}")
    macs, nbytes = e.get("macs"), e.get("bytes")
    if macs is not None and (isinstance(macs, bool) or not isinstance(macs, int) or macs < 0):
        raise err(f"{where}.macs", f"must be a non-negative integer, got {macs!r}")
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, (int, float)) or nbytes < 0):
        raise err(f"{where}.bytes", f"must be a non-negative number, got {nbytes!r}")
    return Entry(float(p50), float(p10), float(p90), n, macs, None if nbytes is None else float(nbytes))

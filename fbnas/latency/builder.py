"""Build, find and load the latency table of a (space, device) pair.

`get_table` is what the search calls: it loads <space>__<device>.json (`table_path`) if it exists (a table
lacking keys of the space is an error, never silently rebuilt); without a file, an analytic device's
table is built in memory (milliseconds), and a measured device's is an error saying how to build it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from .. import __version__ as fbnas_version
from ..errors import LatencyTableError
from ..io import check_name, table_dirs, writable_tables_dir
from ..space import SearchSpace, load_space
from .analytic import kernel_bytes
from .devices import Device, load_device
from .keys import OpSignature, space_signatures
from .table import Entry, LatencyTable

log = logging.getLogger("fbnas.latency")

def table_name(space_name: str, device_name: str) -> str:
    return f"{check_name(space_name, 'space name')}__{check_name(device_name, 'device name')}.json"


def table_path(space_name: str, device_name: str) -> Path:
    """The table a search uses: the first existing file in fbnas.io.table_dirs() (user-built tables first, then
    the shipped ones); where none exists, the path `fbnas lut build` would write."""
    for folder in table_dirs():
        path = folder / table_name(space_name, device_name)
        if path.is_file():
            return path
    return writable_table_path(space_name, device_name)


def writable_table_path(space_name: str, device_name: str) -> Path:
    """Where `fbnas lut build|import` write a table by default (fbnas.io.writable_tables_dir)."""
    return writable_tables_dir() / table_name(space_name, device_name)


def signature_costs(sig: OpSignature) -> tuple[int, float]:
    """(MACs, bytes at the signature's bits) of one signature."""
    ks = sig.kernels()
    return sum(k.macs for k in ks), float(sum(kernel_bytes(k, sig.w_bits, sig.a_bits) for k in ks))


def analytic_entries(signatures: dict[str, OpSignature], device: Device) -> dict[str, Entry]:
    model = device.model()
    out = {}
    for key, sig in signatures.items():
        macs, nbytes = signature_costs(sig)
        out[key] = Entry.exact(model.op_ms(sig.kernels(), sig.w_bits, sig.a_bits), macs, nbytes)
    return out


def build_table(space: SearchSpace | str, device: Device | str | Any, **measure_options: Any) -> LatencyTable:
    """A table covering every key the space can produce, on `device` (analytic: priced by the model;
    measured: each distinct op shape timed as a standalone micro-model)."""
    space = space if isinstance(space, SearchSpace) else load_space(space)
    device = load_device(device)
    signatures = space_signatures(space)
    if device.analytic:
        entries = analytic_entries(signatures, device)
        backend = {"name": device.type, "versions": {"fbnas": fbnas_version}}
        calibration = {"notes": "analytic model; parameters and their sources in the device YAML "
                                f"({device.source}); calibration: bench/calibration.py"}
        return LatencyTable(device=device.name, source="analytic", entries=entries, backend=backend,
                            threads=device.threads, space=space.name, calibration=calibration,
                            device_config=device.to_dict())
    model = device.model()
    return model.build_table(space, signatures, device, **measure_options)


def get_table(space: SearchSpace | str, device: Device | str | Any, path: Optional[str | Path] = None) -> LatencyTable:
    space = space if isinstance(space, SearchSpace) else load_space(space)
    device = load_device(device)
    if path is not None and not Path(path).is_file():
        raise LatencyTableError(f"{path}: latency table not found (field 'lut'); give an existing table, or drop lut= "
                                f"to use latency_tables/{space.name}__{device.name}.json")
    path = Path(path) if path is not None else table_path(space.name, device.name)
    if path.is_file():
        from .table import load_table

        table = load_table(path)
        if table.device != device.name:
            raise LatencyTableError(f"{path}: field 'device' is {table.device!r} but device {device.name!r} was asked "
                                    f"for; pass the right table or rebuild it with "
                                    f"`fbnas lut build space={space.name} device={device.name}`")
        missing = table.check(space)
        if missing:
            raise table.missing_error(missing, space.name)
        return table
    if device.analytic:
        log.info("no latency table at %s; building the analytic %s table for space %s in memory",
                 path, device.name, space.name)
        return build_table(space, device)
    raise LatencyTableError(
        f"{path}: no latency table for measured device {device.name!r}; build it on that machine with "
        f"`fbnas lut build space={space.name} device={device.name}` (or time the ops elsewhere: "
        f"`fbnas lut export-ops` then `fbnas lut import`)")

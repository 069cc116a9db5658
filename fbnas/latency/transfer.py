"""Tables for devices we cannot reach: export every op of a space as a standalone ONNX micro-model plus a
manifest (time them on the device, e.g. with onnxruntime or a TFLite benchmark tool), then import a CSV of
measurements back into a validated table.

CSV: a header with `key,p50` and optionally `p10,p90,n`; one row per key. A key is a full key
(`ir_k3_e6|32x32|16->24|s1|w4a8`) or a shape key without bits (`ir_k3_e6|32x32|16->24|s1`, as in the
manifest), which fills every bit variant the space has. Identity ops (no kernels) are filled with 0 ms.
"""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import LatencyTableError
from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..space import SearchSpace
from .keys import OpSignature, space_signatures, unique_shapes
from .table import Entry, LatencyTable, MISSING_SHOWN, now_iso

OPS_FORMAT = "fbnas-ops/1"
CSV_FIELDS = ("key", "p50", "p10", "p90", "n")


def _listing(keys: list[str]) -> str:
    more = f" (and {len(keys) - MISSING_SHOWN} more)" if len(keys) > MISSING_SHOWN else ""
    return ", ".join(keys[:MISSING_SHOWN]) + more


def _file_name(index: int, shape_key: str) -> str:
    return f"{index:04d}_" + re.sub(r"[^A-Za-z0-9_]+", "_", shape_key.replace("->", "to")).strip("_") + ".onnx"


def layer_subgraphs(model) -> dict[str, object]:
    """`layers.<i>` -> the part of an exported int8 QDQ graph that runs that layer, cut at the uint8 codes it reads
    and writes (Q outputs), so the micro-model holds exactly what the layer runs inside the network: its
    DequantizeLinear -> Conv -> QuantizeLinear chains (which onnxruntime fuses into QLinearConv), adds, shuffles."""
    import onnx
    from onnx.utils import Extractor

    from .measured_int8 import node_parts

    model = onnx.shape_inference.infer_shapes(model)
    parts = node_parts(model)
    producer = {t: n for n in model.graph.node for t in n.output}
    inits = {i.name for i in model.graph.initializer}
    elem = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    byte_codes = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)

    def codes(tensor: str) -> str:
        """The 8-bit codes a DequantizeLinear output comes from (4-bit codes cannot be fed to a session from
        Python or most benchmark tools: the cut stays at the float tensor then)."""
        n = producer.get(tensor)
        if n is not None and n.op_type == "DequantizeLinear" and elem.get(n.input[0]) in byte_codes:
            return n.input[0]
        return tensor

    # a tensor that crosses a part boundary is an input of the consuming layer and an output of the producing one
    layers: dict[str, tuple[list[str], list[str]]] = {}
    for n in model.graph.node:
        for t in n.input:
            if not t or t in inits or t not in producer:
                continue
            src, dst = parts[producer[t].name], parts[n.name]
            if src == dst:
                continue
            for part, side in ((dst, 0), (src, 1)):
                if part.startswith("layers.") and codes(t) not in layers.setdefault(part, ([], []))[side]:
                    layers[part][side].append(codes(t))
    extractor = Extractor(model)
    return {part: extractor.extract_model(ins, outs) for part, (ins, outs) in layers.items() if ins and outs}


def int8_op_models(space: SearchSpace, op: str, w_bits: int, a_bits: int) -> dict[str, object]:
    """Full latency key -> the int8 QDQ micro-model of `op` at that layer shape and bits, cut from the graph
    `fbnas export` ships for a network with `op` in every layer (random weights)."""
    from ..arch import Arch
    from .keys import layer_signature
    from .measured_int8 import int8_graph

    arch = Arch.from_space(space, [op] * space.num_layers, w_bits, a_bits)
    graphs = layer_subgraphs(int8_graph(arch))
    out = {}
    for i in range(space.num_layers):
        if f"layers.{i}" in graphs:
            out.setdefault(layer_signature(space, i, op, w_bits, a_bits).key, graphs[f"layers.{i}"])
    return out


def export_ops(space: SearchSpace, out_dir: str | Path, int8: bool = True) -> Path:
    """Write one float32 ONNX micro-model per distinct (op, shape) of the space; with int8, also one int8 QDQ
    micro-model per (op, shape, bits) as the network runs it (int8/); `manifest.json`; and measurements
    templates (only if none exists: a filled-in file is never overwritten): measurements.csv with the int8 keys
    (every bit pair priced as the device runs it), measurements_fp32.csv with the float shape keys (every bit pair
    priced the same)."""
    import torch

    from .measured import ONNX_OPSET, onnx_bytes, signature_module

    out_dir = Path(out_dir)
    signatures = space_signatures(space)
    shapes = unique_shapes(signatures.values())
    bit_keys: dict[str, list[str]] = {}
    for key, sig in signatures.items():
        bit_keys.setdefault(sig.shape_key, []).append(key)
    ops, skipped = [], []
    for i, (shape_key, sig) in enumerate(sorted(shapes.items())):
        if not sig.kernels():
            skipped.append(shape_key)
            continue
        module, shape = signature_module(sig)
        torch.manual_seed(0)
        name = _file_name(i, shape_key)
        atomic_write_bytes(out_dir / name, onnx_bytes(module, torch.randn(1, *shape)))
        ops.append({"file": name, "shape_key": shape_key, "input": {"name": "x", "shape": [1, *shape],
                                                                       "dtype": "float32"},
                    "keys": sorted(bit_keys[shape_key])})
    int8_ops = _export_int8_ops(space, out_dir) if int8 else []
    manifest = {"format": OPS_FORMAT, "space": space.name, "created": now_iso(), "opset": ONNX_OPSET,
                "notes": "ops: float32 NCHW, batch 1, one per shape (every bit pair priced the same): time each file "
                         "(p50 in ms), list `shape_key,p50[,p10,p90,n]` rows in measurements_fp32.csv. int8_ops: the "
                         "int8 QDQ micro-model of each (op, shape, bits) as the exported network runs it (uint8 codes "
                         "in and out): list `key,p50[,...]` rows in measurements.csv. Then `fbnas lut import csv=...` "
                         "with one of the two files",
                "identity_ops_zero_ms": sorted(skipped), "ops": ops, "int8_ops": int8_ops}
    atomic_write_json(out_dir / "manifest.json", manifest)
    header = ",".join(CSV_FIELDS) + "\n"
    templates = {"measurements_fp32.csv": [o["shape_key"] for o in ops]}
    if int8_ops:
        templates["measurements.csv"] = [o["key"] for o in int8_ops]
    for name, keys in templates.items():
        if not (out_dir / name).exists():
            atomic_write_text(out_dir / name, header + "".join(f"{k},,,,\n" for k in keys))
    return out_dir / "manifest.json"


def _input_spec(value_info) -> dict:
    from onnx import helper

    t = value_info.type.tensor_type
    return {"name": value_info.name, "shape": [d.dim_value or 1 for d in t.shape.dim],  # batch 1
            "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name}


def _export_int8_ops(space: SearchSpace, out_dir: Path) -> list[dict]:
    out = []
    for op in space.candidates:
        for w in space.w_bits:
            for a in space.a_bits:
                for key, model in sorted(int8_op_models(space, op, w, a).items()):
                    name = "int8/" + _file_name(len(out), key)
                    atomic_write_bytes(out_dir / name, model.SerializeToString())
                    out.append({"file": name, "key": key,
                                "inputs": [_input_spec(i) for i in model.graph.input]})
    return out


@dataclass(frozen=True)
class _Row:
    line: int
    key: str
    p50: float
    p10: float
    p90: float
    n: int


def _number(text: str, path: Path, line: int, field: str, positive: bool = True) -> float:
    try:
        val = float(text)
    except ValueError:
        raise LatencyTableError(f"{path}: line {line}: field '{field}' must be a number, got {text!r}") from None
    if not math.isfinite(val) or (positive and val <= 0):
        raise LatencyTableError(f"{path}: line {line}: field '{field}' must be a positive latency in ms, got {text!r}")
    return val


_EXTRA = " extra"  # DictReader's key for values beyond the header


def _read_rows(path: Path) -> list[_Row]:
    if not path.is_file():
        raise LatencyTableError(f"{path}: measurements CSV not found")
    try:
        return _parse_rows(path)
    except UnicodeDecodeError as exc:
        raise LatencyTableError(f"{path}: not UTF-8 text (byte {exc.start}); save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise LatencyTableError(f"{path}: not a readable CSV ({exc}); write plain key,p50[,p10,p90,n] rows") from None


def _parse_rows(path: Path) -> list[_Row]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, restkey=_EXTRA)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "key" not in header or "p50" not in header:
            raise LatencyTableError(f"{path}: line 1: the header must name at least 'key' and 'p50' "
                                    f"(optional: p10, p90, n), got {header}")
        unknown_cols = [h for h in header if h not in CSV_FIELDS]
        if unknown_cols:
            raise LatencyTableError(f"{path}: line 1: unknown column {unknown_cols[0]!r}; columns: {', '.join(CSV_FIELDS)}")
        rows = []
        for line, raw in enumerate(reader, start=2):
            if raw.get(_EXTRA):
                raise LatencyTableError(f"{path}: line {line}: {len(raw[_EXTRA])} value(s) more than the "
                                        f"{len(header)} columns of the header")
            raw = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            if not any(raw.values()):
                continue
            p50 = _number(raw["p50"], path, line, "p50")
            p10 = _number(raw["p10"], path, line, "p10") if raw.get("p10") else p50
            p90 = _number(raw["p90"], path, line, "p90") if raw.get("p90") else p50
            if not p10 <= p50 <= p90:
                raise LatencyTableError(f"{path}: line {line}: needs p10 <= p50 <= p90, got {p10}, {p50}, {p90}")
            n_text = raw.get("n") or "1"
            if not n_text.isdigit() or int(n_text) < 1:
                raise LatencyTableError(f"{path}: line {line}: field 'n' must be a positive integer, got {n_text!r}")
            rows.append(_Row(line, raw["key"], p50, p10, p90, int(n_text)))
    if not rows:
        raise LatencyTableError(f"{path}: no measurement rows")
    return rows


def import_csv(path: str | Path, space: SearchSpace, device_name: str, backend: Optional[dict] = None,
               threads: int = 1, notes: str = "") -> LatencyTable:
    """A table for `space` from measured rows; LatencyTableError (nothing written) on unknown keys,
    non-positive latencies, duplicates or keys of the space left uncovered."""
    path = Path(path)
    signatures = space_signatures(space)
    by_shape: dict[str, list[str]] = {}
    for key, sig in signatures.items():
        by_shape.setdefault(sig.shape_key, []).append(key)
    entries: dict[str, Entry] = {}
    origin: dict[str, int] = {}
    unknown: list[str] = []
    for row in _read_rows(path):
        targets = [row.key] if row.key in signatures else by_shape.get(row.key)
        if not targets:
            unknown.append(row.key)
            continue
        for key in targets:
            if key in origin:
                raise LatencyTableError(f"{path}: line {row.line}: key {key!r} was already given on line {origin[key]}")
            origin[key] = row.line
            entries[key] = Entry(row.p50, row.p10, row.p90, row.n)
    if unknown:
        raise LatencyTableError(f"{path}: {len(unknown)} key(s) are not produced by space {space.name}: "
                                f"{_listing(unknown)}; keys come from `fbnas lut export-ops space={space.name}` "
                                f"(manifest.json)")
    for key, sig in signatures.items():
        if key not in entries and not sig.kernels():
            entries[key] = Entry(0.0, 0.0, 0.0, 0)
    missing = sorted(set(signatures) - set(entries))
    if missing:
        raise LatencyTableError(f"{path}: {len(missing)} key(s) of space {space.name} have no measurement: "
                                f"{_listing(missing)}; nothing was written (a partial import never replaces a table)")
    _add_costs(entries, signatures)
    return LatencyTable(device=device_name, source="imported", entries=entries, threads=threads, space=space.name,
                        backend=backend or {"name": "imported", "versions": {}},
                        calibration={"notes": notes or f"imported from {path.name}", "csv": str(path)})


def _add_costs(entries: dict[str, Entry], signatures: dict[str, OpSignature]) -> None:
    from dataclasses import replace

    from .builder import signature_costs

    for key, e in list(entries.items()):
        macs, nbytes = signature_costs(signatures[key])
        entries[key] = replace(e, macs=macs, bytes=nbytes)

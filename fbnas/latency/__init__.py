"""Latency tables (fbnas-lut/1), device models (analytic and measured) and the table builder."""
from .builder import build_table, get_table, table_path, writable_table_path
from .devices import Device, DeviceModel, known_devices, load_device, register_device_type
from .keys import OpSignature, arch_keys, op_key, parse_key, space_keys
from .lookup import arch_breakdown, arch_latency, fixed_latency, latency_matrix
from .table import LUT_FORMAT, Entry, LatencyTable, load_table

__all__ = ["LUT_FORMAT", "Device", "DeviceModel", "Entry", "LatencyTable", "OpSignature", "arch_breakdown",
           "arch_keys", "arch_latency", "build_table", "fixed_latency", "get_table", "known_devices",
           "latency_matrix", "load_device", "load_table", "op_key", "parse_key", "register_device_type",
           "space_keys", "table_path", "writable_table_path"]

"""`fbnas info <arch.json>`: an architecture at a glance: layers with their ops, bits, MACs and parameters, the
totals (MACs, parameters, size at its bits, BOPs), and its latency on every known device: from the device's
table (the one a search would use) when it has one covering the architecture, else from the device's
analytic model; a measured device without a table is listed as such."""
from __future__ import annotations

import sys

from .common import run_plain


def device_latencies(arch) -> list[tuple[str, object, str]]:
    """(device, table or None, where the numbers come from) for every known device."""
    from ..latency import LatencyTable, load_device, load_table, table_path
    from ..latency.builder import analytic_entries
    from ..latency.devices import known_devices
    from ..latency.keys import arch_signatures

    signatures = {sig.key: sig for _, sig in arch_signatures(arch)}
    out = []
    for name in known_devices():
        device = load_device(name)
        path = table_path(arch.space, name) if arch.space else None
        table = load_table(path) if path is not None and path.is_file() else None
        if table is not None and not table.missing(signatures):
            out.append((name, table, str(path)))
        elif device.analytic:
            out.append((name, LatencyTable(device=name, source="analytic", entries=analytic_entries(signatures, device)),
                        f"{device.type} model"))
        else:
            out.append((name, None, "measured device: no table covers this architecture (fbnas lut build)"))
    return out


def show(path: str) -> None:
    from ..arch import load_arch
    from ..latency import arch_breakdown

    arch = load_arch(path)
    tables = device_latencies(arch)
    shown = [(name, t) for name, t, _ in tables if t is not None]
    print(f"{path}: space {arch.space or '?'}, input {arch.in_channels}x{arch.input_size}x{arch.input_size}, "
          f"{arch.num_classes} classes, {len(arch.layers)} searchable layers")
    per_device = {name: {part: ms for part, _, ms in arch_breakdown(t, arch)} for name, t in shown}
    head = f"{'part':<11} {'op':<14} {'channels':<10} {'s':>1} {'bits':<5} {'MACs':>10} {'params':>8}"
    print(head + "".join(f" {name:>10}" for name, _ in shown) + "   (ms)")
    layer_of = {f"layers.{i}": l for i, l in enumerate(arch.layers)}
    for part, kernels, wb, ab in arch.parts():
        macs, params = sum(k.macs for k in kernels), sum(k.params for k in kernels)
        l = layer_of.get(part)
        op, ch, stride = ((l.op, f"{l.c_in}->{l.channels}", str(l.stride)) if l is not None
                          else ("", f"{kernels[0].c_in}->{kernels[0].c_out}", ""))
        row = f"{part:<11} {op:<14} {ch:<10} {stride:>1} {f'w{wb}a{ab}':<5} {macs:>10,} {params:>8,}"
        print(row + "".join(f" {per_device[name][part]:>10.4f}" for name, _ in shown))
    print(f"{'total':<11} {'':<14} {'':<10} {'':>1} {'':<5} {arch.macs():>10,} {arch.params():>8,}"
          + "".join(f" {sum(per_device[name].values()):>10.4f}" for name, _ in shown))
    print(f"size {arch.size_kb():.1f} KB at its bits | {arch.bops() / 1e9:.4f} GBOPs")
    print("latency sources:")
    for name, _, source in tables:
        print(f"  {name:<14} {source}")
    if arch.provenance.get("device"):
        print(f"searched for device {arch.provenance['device']} (provenance in {path})")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if len(argv) != 1:
        print(f"fbnas: error: 'fbnas info' takes one arch.json, got {' '.join(argv)!r}", file=sys.stderr)
        return 2
    return run_plain(show, argv[0])

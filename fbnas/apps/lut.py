"""`fbnas lut <action> [key=value ...]`: build, check, show and use latency tables.

  build       write <space>__<device>.json (analytic model or measured on this machine) to the checkout's
              latency_tables/, or for an installed package the user data dir ($FBNAS_TABLES_DIR overrides)
  check       coverage of a table against a space
  show        the table as rows: op, shape, bits, latency, MACs, bytes, arithmetic intensity
  predict     whole-model latency of each architecture in archs=<file>, one number (ms) per line
  export-ops  every op of the space as a standalone ONNX micro-model plus manifest.json (out_dir=...)
  import      a CSV of measurements (key, p50[, p10, p90, n]) into a validated table
  export-archs  n architectures spanning the space's latency range as ONNX whole models (out_dir=..., n=20)
  calibrate   fit a device model to whole-model timings (measurements=arch,ms CSV) and write out=NEW.yaml
  devices     the known devices
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..config import LutConfig
from ..errors import ConfigError, LatencyTableError
from .common import CONF_DIR, HELP_FLAGS, device_overrides, run_hydra, show_help, split_subcommand, user_errors

ACTIONS = ("build", "check", "show", "predict", "export-ops", "import", "export-archs", "calibrate", "devices")

ConfigStore.instance().store(name="lut_schema", node=LutConfig)


def _device(cfg):
    from ..latency import load_device

    return load_device(cfg.device_file or cfg.device)


def _read_table(cfg, space, device):
    from ..latency import get_table, load_table

    return load_table(cfg.table) if cfg.table else get_table(space, device)


def do_build(cfg) -> None:
    from ..latency import build_table, load_table, writable_table_path

    space, device = _space(cfg), _device(cfg)
    out = Path(cfg.out) if cfg.out else writable_table_path(space.name, device.name)
    if out.is_file() and not cfg.force:
        old = load_table(out)
        if old.source != "analytic":
            raise LatencyTableError(f"{out}: holds a {old.source} table; building would replace it. Pass force=true "
                                    f"or out=<another file>")

    def progress(i: int, n: int, key: str) -> None:
        print(f"\r  timed {i}/{n} op shapes ({key})".ljust(100), end="", file=sys.stderr, flush=True)

    opts = {k: v for k, v in (("repeats", cfg.repeats), ("warmup", cfg.warmup)) if v is not None}
    if not device.analytic:
        opts["progress"] = progress
    table = build_table(space, device, **opts)
    if not device.analytic:
        print(file=sys.stderr)
    table.save(out)
    print(f"wrote {out}: {len(table)} entries, {table.source} on {device.name} "
          f"({device.description}), space {space.name}")


def do_check(cfg) -> None:
    space, device = _space(cfg), _device(cfg)
    from ..latency import load_table, space_keys, table_path

    path = Path(cfg.table) if cfg.table else table_path(space.name, device.name)
    if not path.is_file():
        raise LatencyTableError(f"{path}: latency table not found; build it with "
                                f"`fbnas lut build space={space.name} device={device.name}`")
    table = load_table(path)
    keys = space_keys(space)
    missing = table.check(space)
    print(f"{path}: {len(keys) - len(missing)}/{len(keys)} keys of space {space.name} covered "
          f"({table.source}, device {table.device}, created {table.created})")
    if missing:
        raise table.missing_error(missing, space.name)


def do_show(cfg) -> None:
    from ..latency.keys import parse_key

    space, device = _space(cfg), _device(cfg)
    table = _read_table(cfg, space, device)
    rows = []
    for key in sorted(table.entries):
        if cfg.filter and cfg.filter not in key:
            continue
        e, sig = table.entries[key], parse_key(key)
        intensity = 2 * e.macs / e.bytes if e.macs is not None and e.bytes else float("nan")
        rows.append((sig.op, f"{sig.h}x{sig.w} {sig.c_in}->{sig.c_out} s{sig.stride}", f"w{sig.w_bits}a{sig.a_bits}",
                     e.p50, e.p10, e.p90, e.macs, e.bytes, intensity))
    if cfg.limit:
        rows = rows[:cfg.limit]
    print(f"# {table.path or 'in-memory table'}: {table.source} on {table.device}, threads {table.threads}, "
          f"{len(table)} entries, unit ms; intensity = FLOPs (2 x MACs) / bytes")
    print(f"{'op':<14} {'shape':<24} {'bits':<6} {'p50 ms':>9} {'p10':>9} {'p90':>9} {'MACs':>11} {'bytes':>10} "
          f"{'FLOP/B':>7}")
    for op, shape, bits, p50, p10, p90, macs, nbytes, ai in rows:
        print(f"{op:<14} {shape:<24} {bits:<6} {p50:>9.4f} {p10:>9.4f} {p90:>9.4f} "
              f"{'' if macs is None else macs:>11} {'' if nbytes is None else int(nbytes):>10} {ai:>7.2f}")


def do_predict(cfg) -> None:
    from ..latency import arch_latency
    from ..latency.archfile import read_archs

    if not cfg.archs:
        raise ConfigError("field 'archs' is required: archs=<arch.json or a file of architectures, one per line>")
    space, device = _space(cfg), _device(cfg)
    table = _read_table(cfg, space, device)
    archs = read_archs(cfg.archs, space, cfg.w_bits or max(space.w_bits), cfg.a_bits or max(space.a_bits))
    for arch in archs:
        print(f"{arch_latency(table, arch):.4f}")


def do_export_ops(cfg) -> None:
    from ..latency.transfer import export_ops

    space = _space(cfg)
    out_dir = Path(cfg.out_dir or f"lut_ops/{space.name}")
    if cfg.precision not in ("int8", "fp32"):
        raise ConfigError(f"field 'precision' is {cfg.precision!r}; use int8 (float and int8 micro-models) or fp32")
    manifest = export_ops(space, out_dir, int8=cfg.precision == "int8")
    csv_name = "measurements.csv" if cfg.precision == "int8" else "measurements_fp32.csv"
    print(f"wrote {manifest} and the ONNX micro-models of space {space.name} in {out_dir}; time them on the device, "
          f"fill {out_dir / csv_name}, then `fbnas lut import space={space.name} device=<name> "
          f"csv={out_dir / csv_name}`")


def do_import(cfg) -> None:
    from ..latency import writable_table_path
    from ..latency.transfer import import_csv

    if not cfg.csv:
        raise ConfigError("field 'csv' is required: csv=<measurements.csv with key,p50[,p10,p90,n]>")
    space, device = _space(cfg), _device(cfg)
    table = import_csv(cfg.csv, space, device.name, threads=device.threads)
    table.device_config = device.to_dict()
    out = Path(cfg.out) if cfg.out else writable_table_path(space.name, device.name)
    table.save(out)
    print(f"wrote {out}: {len(table)} entries imported from {cfg.csv} for device {device.name}, space {space.name}")


def do_export_archs(cfg) -> None:
    from ..latency.fewshot import export_archs

    space, device = _space(cfg), _device(cfg)
    out_dir = Path(cfg.out_dir or f"lut_archs/{space.name}")
    files = export_archs(space, device, cfg.n, cfg.seed, out_dir, cfg.precision)
    print(f"wrote {len(files)} {cfg.precision} ONNX whole models of space {space.name} spanning its latency range on "
          f"{device.name}, archs.txt and measurements.csv in {out_dir}; time each .onnx on the device (batch 1), fill "
          f"in the ms column, then `fbnas lut calibrate space={space.name} device={device.name} "
          f"measurements={out_dir / 'measurements.csv'} out=<name>.yaml`")


def do_calibrate(cfg) -> None:
    from ..io import atomic_write_text
    from ..io import check_name
    from ..latency.fewshot import calibrate, device_yaml, fitted_fields, read_timings

    if not cfg.measurements:
        raise ConfigError("field 'measurements' is required: measurements=<CSV with header arch,ms>")
    if not cfg.out:
        raise ConfigError("field 'out' is required: out=<new device>.yaml")
    out = Path(cfg.out)
    if out.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"field 'out' ({out}) must name a .yaml device file")
    name = check_name(out.stem, "field 'out': the new device's name (the file's stem)")
    space, base = _space(cfg), _device(cfg)
    fields = fitted_fields(base)
    timings = read_timings(cfg.measurements, space, min_rows=len(fields) + 1)
    cal = calibrate(base, timings, cfg.precision)
    print(f"calibrated {base.name} on {len(timings)} whole-model timings ({cfg.precision}) of space {space.name}")
    print(f"{'constant':<26} {'before':>12} {'after':>12}")
    for f in cal.fields:
        print(f"{f:<26} {cal.before[f]:>12.5g} {cal.after[f]:>12.5g}")
    print(f"{'':<26} {'Spearman':>12} {'MAPE':>12}")
    for label, s in (("base model (zero-shot)", cal.zero_shot), ("calibrated, in-sample", cal.in_sample),
                     ("calibrated, leave-one-out", cal.leave_one_out)):
        print(f"{label:<26} {s['spearman']:>12.3f} {s['mape']:>12.1%}")
    print(f"{'MACs alone':<26} {cal.macs_spearman:>12.3f}")
    atomic_write_text(out, device_yaml(cal, name, cfg.measurements, space.name))
    print(f"wrote {out}; use it with `fbnas lut build space={space.name} device={out}` and "
          f"`fbnas search space={space.name} device={out}`")


def do_devices(cfg) -> None:
    from ..latency.devices import describe_devices

    for name, desc in describe_devices():
        print(f"{name:<12} {desc}")


def _space(cfg):
    from ..space import load_space

    return load_space(cfg.space)


HANDLERS = {"build": do_build, "check": do_check, "show": do_show, "predict": do_predict,
            "export-ops": do_export_ops, "import": do_import, "export-archs": do_export_archs,
            "calibrate": do_calibrate, "devices": do_devices}


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="lut")
@user_errors
def _app(cfg: DictConfig) -> None:
    HANDLERS[cfg.action](cfg)


def main(argv: list[str]) -> int:
    if argv and argv[0] in HELP_FLAGS:
        return show_help("fbnas lut <action>", __doc__, LutConfig, "lut", argv[1:])
    try:
        action, rest = split_subcommand(argv, ACTIONS, "lut")
        overrides = [f"action={action}"] + device_overrides(rest)
    except SystemExit as exc:  # fail(): the one-line message is printed already
        return exc.code if isinstance(exc.code, int) else 2
    return run_hydra(_app, f"fbnas lut {action}", overrides, schema=LutConfig, config_name="lut", doc=__doc__)

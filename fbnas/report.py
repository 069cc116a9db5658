"""`fbnas report run=<search run>`: what a search did, from its files: report.md (summary, the derived
architecture with its per-layer latency on the searched device) and three plots over the epochs of
metrics.jsonl: search_ops.png (op probabilities per layer), search_bits.png (weight and activation bit
probabilities per layer), search_curves.png (cross-entropy, expected and argmax latency, accuracy, temperature).
`fbnas report sweep=<multirun dir>`: sweep.md, one row per job (its overrides, derived architecture, latency,
accuracy), and sweep.png (latency against validation accuracy of the derived architectures)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

from .arch import Arch, load_arch
from .errors import ConfigError
from .io import atomic_path, atomic_write_text, read_yaml
from .space import SearchSpace, load_space

PLOTS = ("search_ops.png", "search_bits.png", "search_curves.png")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{path}: not found; field 'run' must be a `fbnas search` run directory")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{i}: malformed JSON ({exc.msg}); the run was cut off mid-line?") from None
    if not records:
        raise ConfigError(f"{path}: no epoch finished yet; report a run after its first epoch")
    return records


def run_space(run: Path, arch: Optional[Arch]) -> SearchSpace:
    """The space the run searched: its space.yaml (a derived space), else the name in its Hydra config."""
    if (run / "space.yaml").is_file():
        return load_space(run / "space.yaml")
    hydra_cfg = run / ".hydra" / "config.yaml"
    name = (read_yaml(hydra_cfg) or {}).get("space") if hydra_cfg.is_file() else None
    name = name or (arch.provenance.get("space") if arch is not None else None)
    if not name:
        raise ConfigError(f"{run}: neither .hydra/config.yaml nor arch.json names the space")
    return load_space(name)


def layer_latencies(arch: Arch, space: SearchSpace) -> tuple[Optional[str], list[tuple[str, str, float]]]:
    """(device, [(part, key, ms)]) on the device the run searched for, from the table it used."""
    from .latency import arch_breakdown, get_table, load_device

    device = arch.provenance.get("device")
    lut = arch.provenance.get("lut")
    if not device:
        return None, []
    try:
        table = get_table(space, load_device(device), lut if lut and Path(lut).is_file() else None)
        return device, arch_breakdown(table, arch)
    except ConfigError:  # a device file that moved, a table that changed: the report goes on without latency
        return device, []


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"{run}: run directory not found (field 'run')")
    out = Path(out_dir) if out_dir else run
    records = read_metrics(run / "metrics.jsonl")
    arch = load_arch(run / "arch.json") if (run / "arch.json").is_file() else None
    space = run_space(run, arch)
    written = [_plot_curves(records, out / "search_curves.png")]
    with_probs = [r for r in records if "op_probs" in r]
    if with_probs:
        written.append(_plot_layers(with_probs, space, "op_probs", list(space.candidates), out / "search_ops.png",
                                    "op probabilities"))
        written.append(_plot_layers(with_probs, space, "bit_probs", None, out / "search_bits.png",
                                    "bit probabilities (weights solid, activations dashed)"))
    text = _markdown(run, records, arch, space, [p.name for p in written], bool(with_probs))
    atomic_write_text(out / "report.md", text)
    return [out / "report.md"] + written


# ----------------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt



def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _plot_curves(records: list[dict], path: Path) -> Path:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    panels = [("cross-entropy", [("ce", "weight steps"), ("arch_ce", "architecture steps"),
                                 ("argmax_val_ce", "argmax arch, validation")]),
              ("latency (ms)", [("lat", "expected, weight steps"), ("arch_lat", "expected, architecture steps"),
                                ("argmax_latency_ms", "argmax arch")]),
              ("accuracy", [("argmax_val_acc", "argmax arch, validation")]),
              ("Gumbel temperature", [("tau", "tau")])]
    for ax, (title, series) in zip(axes.flat, panels):
        for key, label in series:
            pts = [(e, r[key]) for e, r in zip(epochs, records) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    warm = [e for e, r in zip(epochs, records) if r.get("warmup")]
    for ax in axes.flat:
        if warm:
            ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="0.9", zorder=0)
    fig.suptitle("search over epochs (grey: warm-up, weights only)")
    fig.tight_layout()
    return _save(fig, path)


def _plot_layers(records: list[dict], space: SearchSpace, key: str, names: Optional[list[str]], path: Path,
                 title: str) -> Path:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    layers = space.layers()
    n = len(layers)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.4 * rows), squeeze=False, sharex=True, sharey=True)
    epochs = [r["epoch"] for r in records]
    colors = plt.get_cmap("tab10" if (not names or len(names) <= 10) else "tab20").colors
    for l, ax in enumerate(axes.flat):
        if l >= n:
            ax.axis("off")
            continue
        shape = layers[l]
        if key == "op_probs":
            probs = [[r["op_probs"][l][i] for r in records] for i in range(len(names))]
            ax.stackplot(epochs, probs, labels=names, colors=colors[:len(names)], alpha=0.9)
            ax.set_ylim(0, 1)
        else:
            choices = records[-1].get("bit_choices", {"w": space.w_bits, "a": space.a_bits})  # as searched
            values = sorted(set(choices["w"]) | set(choices["a"]))
            for bits, field, style in ((choices["w"], "w_bit_probs", "-"), (choices["a"], "a_bit_probs", "--")):
                for j, b in enumerate(bits):
                    ax.plot(epochs, [r[field][l][j] for r in records], style, color=colors[values.index(b) % 10],
                            label=f"{'w' if field[0] == 'w' else 'a'}{b}")
            ax.set_ylim(0, 1)
        ax.set_title(f"layer {l}: {shape.c_in}->{shape.c_out} s{shape.stride} at {shape.h_in}px", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 8), fontsize=8,
               bbox_to_anchor=(0.5, 1.0 + 0.12 / rows))
    fig.supxlabel("epoch")
    fig.suptitle(f"{space.name}: {title}, softmax(theta)", y=1.0 + 0.2 / rows)
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- markdown

def _markdown(run: Path, records: list[dict], arch: Optional[Arch], space: SearchSpace, plots: list[str],
              with_probs: bool) -> str:
    last = records[-1]

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"# search report: {run}", "", f"space {space.name} ({space.num_layers} layers x "
             f"{len(space.candidates)} ops), {len(records)} epochs in metrics.jsonl", "",
             "| epoch | tau | CE | E[lat] ms | argmax lat ms | argmax val acc |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['epoch']}{' (warm-up)' if r.get('warmup') else ''} | {fmt(r.get('tau'))} | {fmt(r.get('ce'))} | "
              f"{fmt(r.get('lat'))} | {fmt(r.get('argmax_latency_ms'))} | {fmt(r.get('argmax_val_acc'))} |"
              for r in records]
    if arch is None:
        lines += ["", f"No arch.json yet (the run has not finished); last argmax: {', '.join(last['argmax_ops'])}"]
    else:
        device, parts = layer_latencies(arch, space)
        ms = {part: v for part, _, v in parts}
        lines += ["", f"## Derived architecture (arch.json){f', latency on {device}' if ms else ''}", "",
                  "| part | op | channels | stride | bits | ms |", "|---|---|---|---:|---|---:|"]
        lines.append(f"| stem | conv{arch.stem_kernel} | {arch.in_channels}->{arch.stem_channels} | {arch.stem_stride} | "
                     f"w{arch.fixed_w_bits}a{arch.fixed_a_bits} | {fmt(ms.get('stem', ''))} |")
        for i, l in enumerate(arch.layers):
            lines.append(f"| layers.{i} | {l.op} | {l.c_in}->{l.channels} | {l.stride} | w{l.w_bits}a{l.a_bits} | "
                         f"{fmt(ms.get(f'layers.{i}', ''))} |")
        rest = sum(v for k, v in ms.items() if k not in ("stem",) and not k.startswith("layers."))
        if ms:
            lines += [f"| head, pool, classifier | | {arch.head_channels} ch | | w{arch.fixed_w_bits}a{arch.fixed_a_bits} | "
                      f"{fmt(rest)} |", f"| **total** | | | | | **{fmt(sum(ms.values()))}** |"]
        lines += ["", f"size {arch.size_kb():.1f} KB, {arch.macs() / 1e6:.2f} M MACs, {arch.params():,} parameters"]
    if not with_probs:
        lines += ["", "metrics.jsonl holds no op_probs, so the per-layer probability plots are left out."]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- sweeps

def sweep_rows(sweep: Path) -> list[dict]:
    """One row per job directory of a multirun that has an arch.json, in job order; `overrides` holds only the
    overrides that differ between jobs (the swept values)."""
    jobs = [d for d in sweep.iterdir() if d.is_dir() and (d / "arch.json").is_file()]
    rows = []
    for d in sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        arch = load_arch(d / "arch.json")
        device = arch.provenance.get("device", "")
        overrides_file = d / ".hydra" / "overrides.yaml"
        rows.append({"job": d.name, "overrides": read_yaml(overrides_file) or [] if overrides_file.is_file() else [],
                     "device": device,
                     "latency_ms": (arch.predicted.get(device) or {}).get("latency_ms"),
                     "val_acc": arch.predicted.get("val_acc_in_supernet"),
                     "arch": ", ".join(f"{l.op} w{l.w_bits}a{l.a_bits}" if l.op != "skip" else "skip"
                                       for l in arch.layers)})
    common = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    for r in rows:
        r["overrides"] = " ".join(o for o in r["overrides"] if o not in common)
    return rows


def write_sweep_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise ConfigError(f"{sweep}: sweep directory not found (field 'sweep')")
    rows = sweep_rows(sweep)
    if not rows:
        raise ConfigError(f"{sweep}: no finished job (no <job>/arch.json); field 'sweep' must be a `fbnas search -m` "
                          "directory such as runs/sweeps/<time>")
    out = Path(out_dir) if out_dir else sweep
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pts = [r for r in rows if r["latency_ms"] is not None and r["val_acc"] is not None]
    ax.scatter([r["latency_ms"] for r in pts], [r["val_acc"] for r in pts])
    for r in pts:
        ax.annotate(r["overrides"] or r["job"], (r["latency_ms"], r["val_acc"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"predicted latency (ms{', ' + rows[0]['device'] if rows[0]['device'] else ''})")
    ax.set_ylabel("validation accuracy in the supernet")
    ax.set_title(f"{len(rows)} jobs of {sweep.name}")
    ax.grid(alpha=0.3)
    png = _save(fig, out / "sweep.png")
    lines = [f"# sweep report: {sweep}", "", "| job | overrides | device | latency ms | val acc | architecture |",
             "|---|---|---|---:|---:|---|"]
    lines += [f"| {r['job']} | {r['overrides']} | {r['device']} | {r['latency_ms']} | {r['val_acc']} | {r['arch']} |"
              for r in rows]
    lines += ["", f"![{png.name}]({png.name})"]
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
    return [out / "sweep.md", png]


class SweepReport(Callback):
    """A Hydra callback (conf/search.yaml, hydra.callbacks): `fbnas search -m` ends by writing sweep.md and
    sweep.png into the sweep directory."""

    def on_multirun_end(self, config, **kwargs) -> None:
        import logging

        try:
            paths = write_sweep_report(config.hydra.sweep.dir)
        except ConfigError as exc:  # e.g. every job failed: nothing to summarise
            logging.getLogger("fbnas").warning("no sweep report: %s", exc)
            return
        print(f"sweep report: {paths[0]}")

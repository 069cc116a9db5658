"""Records of a Pareto study (pareto.json), its table and per-budget verdicts (pareto.md), and the plot of
integer-only accuracy against device latency with a front per family (pareto.png)."""
from __future__ import annotations

import math
import os
import platform
import statistics
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..io import atomic_path, atomic_write_json, atomic_write_text
from .networks import FAMILIES, Network, bits_label, same_budget

COLORS = {"search": "tab:red", "uniform_bits": "tab:orange", "handcrafted": "tab:blue", "random": "tab:gray"}
MARKERS = {"search": "*", "uniform_bits": "D", "handcrafted": "s", "random": "o"}


def make_record(net: Network, device: str, latency_ms: float, results: Sequence[dict],
                budget_label: Optional[str]) -> dict:
    acc = [r["acc_integer"] for r in results]
    fake = [r["acc_fake_quant"] for r in results if r.get("acc_fake_quant") is not None]
    a = net.arch
    return {"family": net.family, "name": net.name, "device": device, "budget_ms": net.budget_ms,
            "budget": budget_label, "latency_ms": round(latency_ms, 6),
            "acc_integer_mean": round(statistics.fmean(acc), 4),
            "acc_integer_std": round(statistics.stdev(acc), 4) if len(acc) > 1 else None,
            "seeds": [r["seed"] for r in results], "acc_integer": acc,
            "acc_fake_quant_mean": round(statistics.fmean(fake), 4) if fake else None,
            "bits": bits_label(a), "ops": [l.op for l in a.layers], "w_bits": [l.w_bits for l in a.layers],
            "a_bits": [l.a_bits for l in a.layers], "macs": a.macs(), "params": a.params(),
            "size_kb": round(a.size_kb(), 3), "bops": a.bops(), "arch": net.arch_path, "arch_id": net.arch_id,
            "train_seconds_mean": round(statistics.fmean(r["seconds"] for r in results), 2), **net.extra}


def hardware(accelerator: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    from ..accelerator import resolve_device

    dev = resolve_device(accelerator)
    acc = f"{torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else "CPU only"
    return f"{cpu} ({os.cpu_count()} logical cores); trained on: {acc}"


# ------------------------------------------------------------------------------------------ analysis

def pareto_front(records: Sequence[dict]) -> list[dict]:
    """Records no other record beats in both latency (lower) and accuracy (higher), by latency."""
    front, best = [], -math.inf
    for r in sorted(records, key=lambda r: (r["latency_ms"], -r["acc_integer_mean"])):
        if r["acc_integer_mean"] > best:
            front.append(r)
            best = r["acc_integer_mean"]
    return front


def _pm(r: dict) -> str:
    std = r["acc_integer_std"]
    return f"{r['acc_integer_mean']:.2f} ± {std:.2f}" if std is not None else f"{r['acc_integer_mean']:.2f}"


def _noise(a: dict, b: dict) -> float:
    return math.hypot(a["acc_integer_std"] or 0.0, b["acc_integer_std"] or 0.0)


def _verdict(diff: float, noise: float) -> str:
    """noise: the combined sample std over seeds (0 with one seed: no spread to compare with)."""
    word = "yes" if diff >= 0 else "no"
    return f"{word} ({diff:+.2f}{', within the seed spread' if 0 < noise and abs(diff) <= noise else ''})"


def budget_sections(records: Sequence[dict], budgets: Sequence[tuple[float, str]]) -> list[str]:
    lines: list[str] = []
    hand = [r for r in records if r["family"] == "handcrafted"]
    for b_ms, label in budgets:
        lines += ["", f"### Budget {label} ({b_ms:.4g} ms)", ""]
        rand = [r for r in records if r["family"] == "random" and same_budget(r["budget_ms"], b_ms)]
        searched = [r for r in records if r["family"] == "search" and same_budget(r["budget_ms"], b_ms)]
        p90 = None
        if rand:
            accs = np.array([r["acc_integer_mean"] for r in rand])
            p90 = float(np.percentile(accs, 90))
            lats = [r["latency_ms"] for r in rand]
            lines.append(f"Random nets: {len(rand)}, latency {min(lats):.4g}-{max(lats):.4g} ms; integer top-1 "
                         f"median {np.median(accs):.2f}, 90th percentile {p90:.2f}, best {accs.max():.2f}.")
        if not searched:
            lines.append("No search run at this budget.")
        for s in searched:
            lines += ["", f"**{s['name']}**: {s['latency_ms']:.4g} ms ({s['latency_ms'] / b_ms:.2f}x the budget), "
                      f"{_pm(s)} % ({s['bits']})."]
            if p90 is not None:
                lines.append(f"- at least the random 90th percentile: "
                             f"{_verdict(s['acc_integer_mean'] - p90, s['acc_integer_std'] or 0.0)}")
            slower = [h for h in hand if h["latency_ms"] >= s["latency_ms"]]
            if not slower:
                lines.append("- no hand-designed net is as slow as it or slower")
            for h in sorted(slower, key=lambda h: h["latency_ms"]):
                lines.append(f"- vs {h['name']} ({h['latency_ms']:.4g} ms, {_pm(h)} %): at least as accurate: "
                             f"{_verdict(s['acc_integer_mean'] - h['acc_integer_mean'], _noise(s, h))}")
    return lines


def speedup_at_mbv2_accuracy(records: Sequence[dict]) -> list[str]:
    ref = next((r for r in records if r["name"] == "mbv2_W8A8"), None)
    searched = [r for r in records if r["family"] == "search"]
    if ref is None or not searched:
        return []
    ok = [r for r in searched if r["acc_integer_mean"] >= ref["acc_integer_mean"]]
    head = ["", f"## At the MobileNetV2-like W8A8 net's accuracy ({_pm(ref)} %, {ref['latency_ms']:.4g} ms)", ""]
    if not ok:
        best = max(searched, key=lambda r: r["acc_integer_mean"])
        return head + [f"No searched net reaches it (best: {best['name']}, {_pm(best)} %)."]
    fast = min(ok, key=lambda r: r["latency_ms"])
    return head + [f"Fastest searched net at least as accurate: {fast['name']}, {fast['latency_ms']:.4g} ms, "
                   f"{_pm(fast)} %: **{ref['latency_ms'] / fast['latency_ms']:.2f}x faster** on the device model."]


# ------------------------------------------------------------------------------------------ outputs

def write_outputs(out_dir: Path, records: list[dict], budgets: Sequence[tuple[float, str]], header: dict) -> None:
    """pareto.json (the records), pareto.md, pareto.png and command.txt (command, hardware, recipe)."""
    records = sorted(records, key=lambda r: (FAMILIES.index(r["family"]), r["latency_ms"]))
    atomic_write_text(out_dir / "command.txt", "\n".join(f"{k}: {v}" for k, v in header.items()) + "\n")
    atomic_write_json(out_dir / "pareto.json", records)
    atomic_write_text(out_dir / "pareto.md", markdown(records, budgets, header))
    plot(out_dir / "pareto.png", records, budgets, header)


def markdown(records: Sequence[dict], budgets: Sequence[tuple[float, str]], header: dict) -> str:
    dev = records[0]["device"] if records else "?"
    lines = [f"# Accuracy vs latency on {dev}: searched nets and baselines, one training recipe", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", f"Integer-only top-1 (%) on the test set, mean ± sample std over training seeds; latency: the "
              f"{dev} table (ms). Fronts: nets no other net of the family beats in both.", "",
              "| family | name | budget | latency ms | integer top-1 % | seeds | bits (w/a) | MACs | params |",
              "|---|---|---|---:|---:|---:|---|---:|---:|"]
    for r in sorted(records, key=lambda r: r["latency_ms"]):
        lines.append(f"| {r['family']} | {r['name']} | {r['budget'] or ''} | {r['latency_ms']:.4f} | {_pm(r)} | "
                     f"{len(r['seeds'])} | {r['bits']} | {r['macs']:,} | {r['params']:,} |")
    if budgets:
        lines += ["", "## Per budget: searched net vs the random nets' 90th percentile and the hand-designed nets "
                  "that are not faster"]
        lines += budget_sections(records, budgets)
    lines += speedup_at_mbv2_accuracy(records)
    return "\n".join(lines) + "\n"


def plot(path: Path, records: Sequence[dict], budgets: Sequence[tuple[float, str]], header: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    for fam in FAMILIES:
        rs = [r for r in records if r["family"] == fam]
        if not rs:
            continue
        ax.errorbar([r["latency_ms"] for r in rs], [r["acc_integer_mean"] for r in rs],
                    yerr=[r["acc_integer_std"] or 0.0 for r in rs], fmt=MARKERS[fam], color=COLORS[fam],
                    ms=11 if fam == "search" else 6, capsize=3, alpha=0.85, label=fam, linestyle="none",
                    zorder=5 if fam == "search" else 3)
        front = pareto_front(rs)
        if len(front) > 1:
            ax.step([r["latency_ms"] for r in front], [r["acc_integer_mean"] for r in front], where="post",
                    color=COLORS[fam], alpha=0.6, lw=1.2)
        if fam in ("handcrafted", "search"):
            at: dict[tuple[float, float], list[str]] = {}  # nets at the same point share one label
            for r in rs:
                at.setdefault((r["latency_ms"], r["acc_integer_mean"]), []).append(r["name"])
            for xy, names in at.items():
                ax.annotate(" / ".join(names), xy, fontsize=6, xytext=(4, 3), textcoords="offset points",
                            color=COLORS[fam])
    for b_ms, label in budgets:
        ax.axvline(b_ms, color="k", ls=":", lw=0.8, alpha=0.5)
        ax.text(b_ms, ax.get_ylim()[1], f"{label} ", fontsize=7, rotation=90, va="top", ha="right", alpha=0.7)
    dev = records[0]["device"] if records else ""
    ax.set_xlabel(f"latency on {dev} (ms, from its latency table)")
    ax.set_ylabel("integer-only top-1 (%), mean ± std over seeds")
    ax.set_title(f"{header.get('space', '')} on {dev}: accuracy vs latency", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Description": "; ".join(f"{k}: {v}" for k, v in header.items())})
    plt.close(fig)

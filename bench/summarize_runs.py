"""Summarise search runs (a sweep directory or run directories): one line per run with the swept overrides,
the derived architecture's predicted latency, bits and ops. Usage: python bench/summarize_runs.py DIR [DIR ...]"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def runs_under(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        out += sorted(a.parent for a in p.rglob("arch.json"))
    return out


def main(paths: list[str]) -> None:
    for run in runs_under(paths):
        arch = json.loads((run / "arch.json").read_text())
        overrides = (run / ".hydra" / "overrides.yaml")
        ov = " ".join(l.strip("- ").strip() for l in overrides.read_text().splitlines()) if overrides.is_file() else ""
        dev = arch["provenance"]["device"]
        layers = arch["layers"]
        wb = [l["w_bits"] for l in layers]
        ab = [l["a_bits"] for l in layers]
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        print(f"{run.name}: [{ov}] latency {arch['predicted'][dev]['latency_ms']:.4f} ms on {dev}, "
              f"val acc (in supernet) {arch['predicted'].get('val_acc_in_supernet')}, mean w_bits {sum(wb)/len(wb):.2f}, "
              f"mean a_bits {sum(ab)/len(ab):.2f}, ops {[l['op'] for l in layers]}, w {wb}, a {ab}, "
              f"search {sum(m['seconds'] for m in metrics):.0f}s")


if __name__ == "__main__":
    main(sys.argv[1:])

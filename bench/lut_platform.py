"""Platform awareness: search the same space with the same settings and seed on two devices and compare
the bit choices (more 2/4-bit where 2/4-bit pays, i.e. on the bit-serial accelerator).

    PYTHONPATH=$PWD python bench/lut_platform.py [--devices sd835 bitfusion] [--epochs 4] [--steps 40]
        [--accelerator auto|cpu|cuda] [--out bench/results/lut_platform/local.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

from fbnas.config import DataConfig, SearchConfig
from fbnas.io import atomic_write_json
from fbnas.search import run_search


def bit_histogram(arch) -> dict[str, int]:
    return dict(sorted(collections.Counter(f"w{l.w_bits}a{l.a_bits}" for l in arch.layers).items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", nargs="+", default=["sd835", "bitfusion"])
    ap.add_argument("--space", default="fmnist")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40, help="weight steps per epoch")
    ap.add_argument("--train-subset", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--runs", default=None, help="directory for the search runs (default: a temp dir)")
    ap.add_argument("--out", default="bench/results/lut_platform/local.json")
    args = ap.parse_args()
    runs = Path(args.runs or tempfile.mkdtemp(prefix="fbnas_platform_"))
    results = {}
    for dev in args.devices:
        cfg = SearchConfig(space=args.space, device=dev, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                           max_steps_per_epoch=args.steps, seed=args.seed, accelerator=args.accelerator,
                           threads=args.threads, progress=False,
                           data=DataConfig(train_subset=args.train_subset, test_subset=2000))
        res = run_search(cfg, runs / dev)
        arch = res.arch
        hist = bit_histogram(arch)
        low_w = sum(1 for l in arch.layers if l.w_bits < 8)
        low_a = sum(1 for l in arch.layers if l.a_bits < 8)
        results[dev] = {"bits": hist, "layers_w_below_8": low_w, "layers_a_below_8": low_a,
                        "avg_w_bits": sum(l.w_bits for l in arch.layers) / len(arch.layers),
                        "avg_a_bits": sum(l.a_bits for l in arch.layers) / len(arch.layers),
                        "predicted": arch.predicted, "summary": arch.summary(), "arch_json": str(runs / dev / "arch.json")}
        print(f"== {dev}: bits {hist}; weights < 8 bit in {low_w}/{len(arch.layers)} layers, "
              f"activations < 8 bit in {low_a}/{len(arch.layers)}")
        print(arch.summary(), flush=True)
    atomic_write_json(args.out, {"space": args.space, "seed": args.seed, "epochs": args.epochs, "steps": args.steps,
                                 "results": results})
    print(f"wrote {args.out}")
    print(json.dumps({d: {k: r[k] for k in ("bits", "avg_w_bits", "avg_a_bits")} for d, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Additivity of a measured latency table on real hardware: the LUT sum of random architectures vs their
measured whole-model latency, same backend, same threads.

    PYTHONPATH=$PWD python bench/lut_additivity.py --backend ort|torch|cuda|ort_int8 [--archs 50]
        [--space fbnet_cifar100] [--threads 1] [--repeats 100] [--random-bits]
        [--out bench/results/lut_additivity/local-<backend>.json]

Builds the measured table (float backends: each distinct op shape a standalone float32 micro-model; ort_int8:
in-network differences of the exported int8 graphs, fbnas/latency/measured_int8.py), samples --archs
architectures uniformly from the space (seeded; --random-bits also draws each layer's bits), builds each
(float: fbnas.build_model(arch, quantized=False); ort_int8: its exported int8 graph), times it the same way, and
prints Spearman and the mean absolute percentage error (targets: >= 0.95, <= 10%).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from fbnas import build_model
from fbnas.arch import Arch
from fbnas.io import atomic_write_json
from fbnas.latency import arch_latency, build_table, load_device
from fbnas.latency.measured import backend_versions, time_module
from fbnas.space import load_space

DEVICES = {"ort": "host_ort", "torch": "host_torch", "cuda": "cuda", "ort_int8": "host_ort_int8"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=sorted(DEVICES), default="ort")
    ap.add_argument("--archs", type=int, default=50)
    ap.add_argument("--space", default="fbnet_cifar100")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=None, help="default: the device YAML's")
    ap.add_argument("--repeats", type=int, default=None, help="default: the device YAML's")
    ap.add_argument("--graph-unroll", type=int, default=None,
                    help="cuda: calls per CUDA graph (0 = eager launches); default: the device YAML's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-bits", action="store_true", help="draw each layer's w/a bits from the space too")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    space = load_space(args.space)
    dev = load_device(DEVICES[args.backend])
    dev = dataclasses.replace(dev, threads=args.threads)
    if args.graph_unroll is not None:
        dev = dataclasses.replace(dev, params=dataclasses.replace(dev.params, graph_unroll=args.graph_unroll))
    unroll = getattr(dev.params, "graph_unroll", 0)
    warmup = dev.params.warmup if args.warmup is None else args.warmup
    repeats = dev.params.repeats if args.repeats is None else args.repeats
    t0 = time.time()
    table = build_table(space, dev, warmup=warmup, repeats=repeats)
    t_table = time.time() - t0
    timed = table.calibration.get("distinct_shapes_timed", table.calibration.get("networks_timed"))
    print(f"measured table: {timed} op shapes / networks in {t_table:.1f} s "
          f"({args.backend}, {args.threads} thread(s), warmup {warmup}, repeats {repeats}, "
          f"graph unroll {unroll})", flush=True)

    rng = np.random.default_rng(args.seed)
    rows = []
    for i in range(args.archs):
        ops = [space.candidates[j] for j in rng.integers(0, len(space.candidates), space.num_layers)]
        if args.random_bits:
            wb = [int(b) for b in rng.choice(space.w_bits, space.num_layers)]
            ab = [int(b) for b in rng.choice(space.a_bits, space.num_layers)]
        else:
            wb, ab = max(space.w_bits), max(space.a_bits)
        arch = Arch.from_space(space, ops, wb, ab)
        if args.backend == "ort_int8":
            (whole,) = dev.model().time_archs([arch], warmup, repeats)
        else:
            torch.manual_seed(i)
            model = build_model(arch, quantized=False).eval()
            x = torch.randn(dev.params.batch, space.in_channels, space.input_size, space.input_size)
            whole = time_module(model, x, args.backend, args.threads, warmup, repeats, unroll)
        rows.append({"ops": ops, "w_bits": wb, "a_bits": ab, "lut_sum_ms": arch_latency(table, arch), "measured_p50_ms": whole.p50,
                     "measured_p10_ms": whole.p10, "measured_p90_ms": whole.p90})
        print(f"  arch {i + 1:>3}/{args.archs}: LUT sum {rows[-1]['lut_sum_ms']:.3f} ms, "
              f"measured {whole.p50:.3f} ms", flush=True)
    lut = np.array([r["lut_sum_ms"] for r in rows])
    meas = np.array([r["measured_p50_ms"] for r in rows])
    rho = float(spearmanr(lut, meas).correlation)
    mape = float(np.mean(np.abs(lut - meas) / meas) * 100)
    bias = float(np.mean(lut / meas))
    ok = rho >= 0.95 and mape <= 10
    print(f"{args.backend} {args.space} ({args.archs} archs, {args.threads} thread(s)): Spearman {rho:.4f} "
          f"(target >= 0.95), MAPE {mape:.2f}% (target <= 10%), mean LUT/measured {bias:.3f} -> "
          f"{'PASS' if ok else 'FAIL'}")
    out = args.out or f"bench/results/lut_additivity/local-{args.backend}.json"
    atomic_write_json(out, {"backend": args.backend, "space": args.space, "threads": args.threads,
                            "warmup": warmup, "repeats": repeats, "graph_unroll": unroll,
                            "archs": args.archs, "seed": args.seed, "random_bits": args.random_bits,
                            "spearman": rho, "mape_percent": mape, "mean_lut_over_measured": bias,
                            "table_seconds": t_table, "versions": backend_versions("ort" if args.backend == "ort_int8" else args.backend), "rows": rows})
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

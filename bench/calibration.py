"""Calibration of the analytic device models against whole-network measurements, in one command:

    python bench/calibration.py [--fit] [--loo] [--archs 2000] [--out bench/results/calibration/models.json]

Data: fbnas/latency/data/ (whole_model_latency.csv, the Pixel 3 per-block CSV; sources in its README.md).
Prints, with PASS/FAIL, and exits 1 if a check fails:
  - zero-shot rank agreement of the shipped device files with each group of networks measured together
    (same SoC, framework, threads, precision), against MACs alone;
  - MobileNet-v1/v2 anchors within +-25% (sd835 vs XNNPACK on a Pixel 2, a11 vs TFLite on an iPhone 8);
  - rank agreement with the Pixel 3 per-block sums over random FBNet CIFAR-100 architectures (>= 0.97).
--fit refits the sd835 constants (least squares on log ratios, one level factor per framework) and prints them
with in-sample errors, and the a11 constants that follow from the sd835 file; --loo adds leave-one-network-out
errors and rank agreement: each network's rows (fp32, and int8 at the file's int8 speed-ups) predicted by a fit to
the other networks, Spearman per group of networks measured together against MACs alone on the same rows.
The fit runs on the CPU (seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from dataclasses import asdict

from fbnas.io import atomic_write_json
from fbnas.latency import load_device
from fbnas.latency.calibration import (FITS, check_model_targets, check_pixel3_ranks, check_whole_model_ranks,
                                       fit_a11, fit_device, fit_rows, leave_one_network_out,
                                       whole_model_measurements)
from fbnas.latency.measured import _cpu_name


def show(results) -> None:
    for r in results:
        print(f"  {r.name:<66} {r.value:>9.3f}  {r.goal:<44} {'PASS' if r.ok else 'FAIL'} {r.detail}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", type=int, default=2000, help="random FBNet CIFAR-100 architectures for the Pixel 3 ranks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit", action="store_true", help="refit the sd835 constants and print them")
    ap.add_argument("--loo", action="store_true", help="leave-one-network-out errors of the fit")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    rows = whole_model_measurements()
    report: dict = {"command": "python bench/calibration.py " + " ".join(sys.argv[1:]),
                    "hardware": f"{_cpu_name()} ({os.cpu_count()} logical cores, {platform.machine()}); CPU only"}
    spec = FITS["sd835"]
    base = load_device(spec.device)
    if args.fit or args.loo:
        fit_set = fit_rows(spec, rows)
        fit = fit_device(spec, fit_set)
        print(f"fit of {spec.device} to {len(fit_set)} whole-network fp32 rows of the {spec.soc}:")
        print("  constants:", json.dumps({k: round(v, 4) for k, v in fit.params.items()}))
        print("  framework level factors:", json.dumps({k: round(v, 3) for k, v in fit.framework_factor.items()}))
        errs = [fit.predict(base, m) / m.ms - 1 for m in fit_set]
        print(f"  in-sample |error|: median {statistics.median(abs(e) for e in errs):.1%}, "
              f"max {max(abs(e) for e in errs):.1%}")
        a11 = fit_a11(rows)
        print("  a11 (sd835's ratios, one factor and the int8 speed-up fitted to MobileNet-v1 on an iPhone 8):",
              json.dumps({k: round(v, 4) for k, v in a11.items()}))
        report["fit"] = {"params": fit.params, "framework_factor": fit.framework_factor,
                         "in_sample_median_abs_error": statistics.median(abs(e) for e in errs),
                         "in_sample_max_abs_error": max(abs(e) for e in errs), "a11": a11}
        if args.loo:
            int8 = [m for m in rows if m.soc == spec.soc and m.precision == "int8"
                    and m.framework not in spec.exclude_frameworks]
            loo = leave_one_network_out(spec, fit_set, also=int8)
            print("leave-one-network-out (each network predicted by a fit to the others):")
            for m, pred in loo.items():
                print(f"  {m.framework[:12]:<12} {m.threads}t {m.precision} {m.model:<20} measured {m.ms:8.1f} ms  "
                      f"predicted {pred:8.1f}  {pred / m.ms - 1:+.1%}")
            ape = [abs(p / m.ms - 1) for m, p in loo.items() if m.precision == "fp32"]
            ape8 = [abs(p / m.ms - 1) for m, p in loo.items() if m.precision == "int8"]
            print(f"  fp32 MAPE {statistics.mean(ape):.1%}, median {statistics.median(ape):.1%}; int8 MAPE "
                  f"{statistics.mean(ape8):.1%} (int8 speed-ups of the file, not fitted)")
            loo_ranks = check_whole_model_ranks(base, list(loo), predict=lambda m: loo[m], label="leave-one-out")
            show(loo_ranks)
            report["leave_one_out"] = {"mape": statistics.mean(ape), "median_ape": statistics.median(ape),
                                       "int8_mape": statistics.mean(ape8),
                                       "rows": [{**asdict(m), "predicted_ms": p} for m, p in loo.items()],
                                       "ranks": [asdict(r) for r in loo_ranks]}
    print("zero-shot rank agreement of the shipped device files (Spearman over the networks of each group):")
    ranks = []
    for name, soc in (("sd835", "Snapdragon 835"), ("a11", "Apple A11")):
        dev = load_device(name)
        ranks += check_whole_model_ranks(dev, [m for m in rows if m.soc == soc], label=f"{name} zero-shot")
    show(ranks)
    print("anchors:")
    anchors = check_model_targets(rows)
    show(anchors)
    print("Pixel 3 per-block sums (FBNet CIFAR-100 macro):")
    pixel3 = check_pixel3_ranks(load_device("sd835"), args.archs, args.seed)
    show(pixel3)
    results = ranks + anchors + pixel3
    report["results"] = [{**asdict(r), "value": float(r.value), "ok": bool(r.ok)} for r in results]
    if args.out:
        atomic_write_json(args.out, report)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

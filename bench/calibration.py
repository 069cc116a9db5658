"""Calibration of the analytic device models against public measurements, in one command:

    PYTHONPATH=$PWD python bench/calibration.py [--anchors ../shared/latency_anchors] [--archs 2000] [--fit]
                                                [--out bench/results/calibration/models.json]

Prints each target (MobileNet-v1/v2 on the sd835/a11 models vs XNNPACK/TFLite measurements, the int8/fp32
ratio, Spearman rank agreement with the Pixel 3 per-block data) with PASS/FAIL, and exits 1 if any fails.
--fit refits the constants the device YAMLs mark as fitted and prints them (paste them into the YAML).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from fbnas.io import atomic_write_json
from fbnas.latency import load_device
from fbnas.latency.calibration import anchors_dir, check_model_targets, check_pixel3_ranks, fit_a11, fit_sd835


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", default=None, help="shared/latency_anchors directory")
    ap.add_argument("--archs", type=int, default=2000, help="random FBNet CIFAR-100 architectures for the ranks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank-device", default="sd835", help="device model compared with the Pixel 3 ranks")
    ap.add_argument("--fit", action="store_true", help="refit the fitted constants and print them")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    anchors = anchors_dir(args.anchors)
    if args.fit:
        print("fitted sd835:", json.dumps({k: round(v, 4) for k, v in fit_sd835(anchors).items()}))
        print("fitted a11:  ", json.dumps({k: round(v, 4) for k, v in fit_a11(anchors).items()}))
    results = check_model_targets(anchors) + check_pixel3_ranks(anchors, load_device(args.rank_device),
                                                                 args.archs, args.seed)
    print(f"{'target':<44} {'value':>9}  {'goal':<40} result")
    for r in results:
        unit = "" if "rank" in r.name or "/" in r.name else " ms"
        print(f"{r.name:<44} {r.value:>9.3f}{unit:<3} {r.goal:<40} {'PASS' if r.ok else 'FAIL'} {r.detail}")
    if args.out:
        atomic_write_json(args.out, {"results": [{**asdict(r), "value": float(r.value), "ok": bool(r.ok)} for r in results], "archs": args.archs, "seed": args.seed})
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

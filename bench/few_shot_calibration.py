"""Few-shot calibration of a device model from whole-model timings, judged on architectures it never saw.

    python bench/few_shot_calibration.py [--sets pixel3,host_ort_int8,host_ort] [--shots 20] [--archs 100]
                                         [--out bench/results/few_shot_calibration/<cpu>.md]

For each set of whole-model latencies, `--shots` architectures are chosen as `fbnas lut export-archs` chooses
them (spread over the base model's latency range), the base device's constants are fitted to them exactly as
`fbnas lut calibrate` does, and rank agreement (Spearman) and MAPE are measured on every other architecture of
the set, next to MACs alone and the base model before calibration (zero-shot).

  pixel3         2000 random fbnet_cifar100 architectures (fp32): HW-NAS-Bench Pixel 3 per-block sums (base sd835)
  host_ort_int8  --archs random W8A8 fmnist architectures: the int8 QDQ graphs `fbnas export` ships, timed whole in
                 onnxruntime on this CPU, 1 thread, runs interleaved (base sd835)
  host_ort       the same architectures as float32 graphs (base sd835, fp32)
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
from scipy.stats import spearmanr

from fbnas.arch import Arch
from fbnas.io import atomic_write_json, atomic_write_text
from fbnas.latency import load_device
from fbnas.latency.calibration import pixel3_latencies, random_archs
from fbnas.latency.fewshot import Timing, arch_ms, fit_constants, random_pool, spread_indices, whole_model_onnx
from fbnas.latency.measured import _cpu_name
from fbnas.space import load_space


def pixel3_set(n: int, seed: int):
    space = load_space("fbnet_cifar100")
    idx = random_archs(space, n, seed)
    truth = pixel3_latencies(space, idx)
    archs = [Arch.from_space(space, [space.candidates[i] for i in row], 8, 8) for row in idx]
    return archs, truth, "fp32"


def ort_set(n: int, seed: int, precision: str, repeats: int):
    from fbnas.latency.measured_int8 import run_interleaved
    import onnx

    space = load_space("fmnist")
    archs = random_pool(space, load_device("sd835"), n, seed)
    models = [onnx.load_from_string(whole_model_onnx(a, precision, seed)) for a in archs]
    times = run_interleaved(models, batch=1, threads=1, warmup=20, repeats=repeats)
    return archs, np.array([np.median(t) for t in times]), precision


def evaluate(name: str, archs, truth, precision: str, shots: int, base_name: str) -> dict:
    base = load_device(base_name)
    zero = np.array([arch_ms(base, a, precision) for a in archs])
    picks = spread_indices(zero, shots)
    rest = np.setdiff1d(np.arange(len(archs)), picks)
    t0 = time.time()
    fitted = fit_constants(base, [Timing(0, archs[i], float(truth[i]), "") for i in picks], precision)
    fit_s = time.time() - t0
    from dataclasses import replace
    params = replace(base.params, **fitted)
    cal = np.array([arch_ms(base, archs[i], precision, params) for i in rest])
    macs = np.array([archs[i].macs() for i in rest])
    t = truth[rest]

    def rho(p):
        return float(spearmanr(t, p).correlation)

    return {"set": name, "archs": len(archs), "shots": len(picks), "held_out": len(rest), "base": base_name,
            "precision": precision, "macs_spearman": rho(macs), "zero_shot_spearman": rho(zero[rest]),
            "calibrated_spearman": rho(cal), "zero_shot_mape": float(np.mean(np.abs(zero[rest] / t - 1))),
            "calibrated_mape": float(np.mean(np.abs(cal / t - 1))), "fit_seconds": fit_s,
            "constants": fitted, "truth_ms_mean": float(t.mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="pixel3,host_ort_int8,host_ort")
    ap.add_argument("--shots", type=int, default=20)
    ap.add_argument("--archs", type=int, default=100, help="random architectures timed per host set")
    ap.add_argument("--pixel3-archs", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write a markdown report (and .json beside it)")
    args = ap.parse_args()
    results = []
    for name in args.sets.split(","):
        t0 = time.time()
        if name == "pixel3":
            archs, truth, prec = pixel3_set(args.pixel3_archs, args.seed)
        elif name in ("host_ort_int8", "host_ort"):
            archs, truth, prec = ort_set(args.archs, args.seed, "int8" if name == "host_ort_int8" else "fp32",
                                         args.repeats)
        else:
            print(f"unknown set {name!r}", file=sys.stderr)
            return 2
        r = evaluate(name, archs, truth, prec, args.shots, "sd835")
        r["seconds"] = time.time() - t0
        results.append(r)
        print(f"{name:<14} {r['shots']} shots, {r['held_out']} held out: Spearman MACs {r['macs_spearman']:.3f}  "
              f"zero-shot {r['zero_shot_spearman']:.3f}  calibrated {r['calibrated_spearman']:.3f};  MAPE zero-shot "
              f"{r['zero_shot_mape']:.1%}  calibrated {r['calibrated_mape']:.1%}  ({r['seconds']:.0f} s)", flush=True)
    if args.out:
        cmd = "python bench/few_shot_calibration.py " + " ".join(sys.argv[1:])
        hw = f"{_cpu_name()} ({platform.machine()}), onnxruntime 1 thread"
        lines = ["# Few-shot calibration from whole-model timings", "", f"Command: `{cmd}`", f"Hardware: {hw}", "",
                 "| set | base | shots | held out | Spearman: MACs | zero-shot | calibrated | MAPE: zero-shot | "
                 "calibrated |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results:
            lines.append(f"| {r['set']} ({r['precision']}) | {r['base']} | {r['shots']} | {r['held_out']} | "
                         f"{r['macs_spearman']:.3f} | {r['zero_shot_spearman']:.3f} | **{r['calibrated_spearman']:.3f}**"
                         f" | {r['zero_shot_mape']:.1%} | {r['calibrated_mape']:.1%} |")
        atomic_write_text(args.out, "\n".join(lines) + "\n")
        atomic_write_json(str(args.out).rsplit(".", 1)[0] + ".json", {"command": cmd, "hardware": hw,
                                                                      "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

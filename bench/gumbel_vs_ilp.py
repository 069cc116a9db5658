"""Gumbel-searched bits vs HAWQ-V3 ILP bits at the same LUT latency, Fashion-MNIST.

Given a searched arch.json (from `fbnas search`; `predicted[<device>].latency_ms` is the Gumbel result's LUT
latency), or a short search run here when --arch is omitted:
  1. the W8A8 version of the same ops is trained (QAT); its weights give the ILP's sensitivity
     (||Q_b(W) - W||^2 per layer, or --hessian traces from `fbnas hessian`),
  2. the ILP picks bits for the same ops with latency_ms <= the searched arch's LUT latency on the same device,
  3. both bit allocations are trained with the same QAT schedule,
and a table of integer-only accuracy, predicted latency, BOPs and size is printed and written to --out.

    python bench/gumbel_vs_ilp.py --device cuda                               # H100: search + 3 trainings
    python bench/gumbel_vs_ilp.py --arch runs/search/.../arch.json --device cuda
    python bench/gumbel_vs_ilp.py --search-epochs 1 --search-steps 2 --epochs 1 --fold-epochs 1 --steps 2 \\
        --train-subset 2000 --test-subset 256 --device cpu                     # smoke
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fbnas import load_space
from fbnas.arch import load_arch
from fbnas.data import load_dataset
from fbnas.ilp import ilp_arch, read_hessian, weight_perturbation
from fbnas.io import atomic_write_text
from fbnas.latency import arch_latency, get_table
from fbnas.quant.artifacts import load_folded
from fbnas.train import TrainSettings, train


def search_arch(a, out: Path):
    from fbnas.config import DataConfig, ObjectiveConfig, SearchConfig
    from fbnas.search import run_search

    data = DataConfig(train_subset=a.train_subset, test_subset=a.test_subset, batch_size=a.batch_size)
    objective = ObjectiveConfig(kind=a.search_objective,
                                limit_ms=a.search_limit_ms if a.search_objective == "target" else None)
    cfg = SearchConfig(space="fmnist", device=a.lut_device, epochs=a.search_epochs, objective=objective,
                       warmup_epochs=min(1, max(a.search_epochs - 1, 0)), max_steps_per_epoch=a.search_steps,
                       accelerator=a.device, progress=False, data=data, seed=a.seed)
    return run_search(cfg, out).arch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="", help="searched arch.json (default: run a short search first)")
    ap.add_argument("--lut-device", default="", help="latency device (default: the searched arch's provenance)")
    ap.add_argument("--hessian", default="", help="fbnas-hessian/1 traces of the W8A8 model (else weight perturbation)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--search-epochs", type=int, default=6)
    ap.add_argument("--search-steps", type=int, default=0, help="max weight steps per search epoch (0 = all)")
    ap.add_argument("--search-objective", default="target", help="target | multiplicative | additive")
    ap.add_argument("--search-limit-ms", type=float, default=0.035,
                    help="target objective: keep E[LAT] under this (bitfusion W8A8 children are ~0.05-0.07 ms)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--fold-epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="training steps per epoch (0 = whole epochs)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--test-subset", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="/tmp/fbnas_gumbel_vs_ilp")
    ap.add_argument("--out", default="bench/results/gumbel_vs_ilp/local.md")
    a = ap.parse_args()
    runs = Path(a.runs)
    t0 = time.time()
    if a.arch:
        searched = load_arch(a.arch)
        a.lut_device = a.lut_device or searched.provenance.get("device", "bitfusion")
        source = a.arch
    else:
        a.lut_device = a.lut_device or "bitfusion"
        searched = search_arch(a, runs / "search")
        source = (f"fbnas search ({a.search_epochs} epochs, {a.lut_device}, objective {a.search_objective}"
                  f"{f' <= {a.search_limit_ms} ms' if a.search_objective == 'target' else ''}) in {runs / 'search'}")
    space = load_space(searched.space)
    table = get_table(space, a.lut_device)
    lut_ms = arch_latency(table, searched)
    stored = searched.predicted.get(a.lut_device, {}).get("latency_ms") if isinstance(
        searched.predicted.get(a.lut_device), dict) else None
    if stored is not None and abs(stored - lut_ms) > 1e-6 * max(1.0, lut_ms):
        print(f"note: arch.json predicts {stored} ms on {a.lut_device}, the table gives {lut_ms} ms; using the table")

    data = load_dataset("fashion_mnist", train_subset=a.train_subset, test_subset=a.test_subset, seed=a.seed)
    base = dict(epochs=a.epochs, fold_epochs=a.fold_epochs, max_steps_per_epoch=a.steps, batch_size=a.batch_size,
                lr=a.lr, accelerator=a.device, seed=a.seed)
    w8_arch = searched.with_bits(8, 8)
    w8 = train(w8_arch, data, TrainSettings(**base), runs / "w8a8")
    if a.hessian:
        omega, sens = read_hessian(a.hessian), f"Hessian traces {a.hessian}"
    else:
        folded = load_folded(runs / "w8a8" / "model.safetensors")
        omega, sens = weight_perturbation(folded, len(w8_arch.layers), space.w_bits), "weight perturbation of W8A8"
    ilp = ilp_arch(w8_arch, omega, space.w_bits, space.a_bits, limits={"latency_ms": lut_ms}, table=table,
                   device=a.lut_device, source=sens)
    ilp.arch.save(runs / "arch_ilp.json")
    gumbel = train(searched, data, TrainSettings(**base), runs / "gumbel")
    ilp_m = train(ilp.arch, data, TrainSettings(**base), runs / "ilp")

    rows = [("W8A8 (same ops)", w8_arch, w8), ("Gumbel search", searched, gumbel), ("ILP (HAWQ-V3)", ilp.arch, ilp_m)]
    lines = [f"# Gumbel-searched bits vs ILP bits at equal {a.lut_device} LUT latency (Fashion-MNIST, "
             f"{len(data.test)} test images)", "",
             f"searched arch: {source}; ops {','.join(l.op for l in searched.layers)}", "",
             f"ILP: latency_ms <= {lut_ms:.6g} (the searched arch's), sensitivity: {sens}; training device "
             f"{a.device}, {a.epochs} + {a.fold_epochs} folded epochs, steps/epoch {a.steps or 'all'}, "
             f"seed {a.seed}; wall {time.time() - t0:.0f} s", "",
             f"| bits from | w/a bits per layer | {a.lut_device} latency ms | BOPs (G) | size KB | acc integer-only | "
             "acc fake-quant |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, ar, m in rows:
        bits = " ".join(f"{l.w_bits}/{l.a_bits}" for l in ar.layers)
        lines.append(f"| {name} | {bits} | {arch_latency(table, ar):.5g} | {ar.bops() / 1e9:.4f} | "
                     f"{ar.size_kb():.1f} | {m['acc_integer']:.2f} | {m['acc_fake_quant']:.2f} |")
    lines += ["", f"ILP - Gumbel: {ilp_m['acc_integer'] - gumbel['acc_integer']:+.2f} points (integer-only)"]
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, text)
    print(text)
    print(json.dumps({"gumbel": gumbel["acc_integer"], "ilp": ilp_m["acc_integer"], "w8a8": w8["acc_integer"],
                      "latency_limit_ms": lut_ms}))


if __name__ == "__main__":
    main()

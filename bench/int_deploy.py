"""Integer-only deployment on Fashion-MNIST: FP32 vs W8A8 integer-only vs an ILP mixed 2/4/8-bit allocation at
<= `--ratio` of the W8A8 version's predicted latency on `--lut-device` (bitfusion LUT; `--limit bops` for
bit-operations), plus the integer-vs-fake check and the onnxruntime checks (ConvInteger/MatMulInteger accumulators
on --ort-samples images; the whole-model qlinear and qdq graphs on the test set: LSB bounds and top-1 agreement).
Writes a markdown table to --out (default bench/results/int_deploy/local.md).

    python bench/int_deploy.py --device cuda --epochs 8 --fold-epochs 2       # H100, a few minutes
    python bench/int_deploy.py --train-subset 512 --test-subset 256 --epochs 1 --fold-epochs 1 --steps 2  # smoke
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fbnas import Arch, load_space
from fbnas.data import load_dataset
from fbnas.ilp import ilp_arch, loss_sensitivity, weight_perturbation
from fbnas.io import atomic_write_text
from fbnas.latency import arch_latency, get_table
from fbnas.quant.artifacts import load_folded, load_unfolded
from fbnas.quant.integer import to_integer
from fbnas.quant.onnx_check import check_graph, check_with_onnxruntime, format_graph_check
from fbnas.train import TrainSettings, train

OPS = "ir_k3_e1,ir_k3_e3,shuffle_k3,sqnxt_k3,ir_k3_e3,ir_k3_e3"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default=OPS)
    ap.add_argument("--space", default="fmnist28", help="the space of --ops (fmnist28: full 28x28 resolution)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--fold-epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=0, help="steps per epoch (0 = whole epochs)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--limit", choices=("latency", "bops"), default="latency")
    ap.add_argument("--lut-device", default="bitfusion")
    ap.add_argument("--ratio", type=float, default=0.6, help="ILP limit as a fraction of the W8A8 version's")
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--test-subset", type=int, default=0)
    ap.add_argument("--ort-samples", type=int, default=1000, help="images for the accumulator check")
    ap.add_argument("--graph-samples", type=int, default=0, help="images for the whole-graph top-1 (0 = test set)")
    ap.add_argument("--lsb-samples", type=int, default=1000, help="images whose every tensor is compared")
    ap.add_argument("--w8-init", choices=("scratch", "fp32"), default="scratch",
                    help="W8A8 QAT from scratch, or fine-tuned from the FP32 model at lr x --mixed-lr-scale")
    ap.add_argument("--mixed-init", choices=("w8a8", "scratch"), default="w8a8",
                    help="the mixed model fine-tunes the trained W8A8 model (HAWQ-V3's flow) or trains from scratch")
    ap.add_argument("--mixed-lr-scale", type=float, default=0.2, help="mixed fine-tune lr = lr x this")
    ap.add_argument("--sensitivity", choices=("loss", "weights"), default="loss",
                    help="ILP Omega: the measured loss rise per layer and (w, a) pair of the trained W8A8 model, or "
                         "HAWQ's weight perturbation (activation bits then follow weight bits)")
    ap.add_argument("--sensitivity-images", type=int, default=2000, help="training images for --sensitivity loss")
    ap.add_argument("--act-clip", default="mse",
                    help="activation ranges of the mixed model, comma-separated variants each trained and reported: "
                         "max (EMA of min/max) | mse (EMA of the MSE-optimal clip at the layer's bits)")
    ap.add_argument("--w8-act-clip", choices=("max", "mse"), default="mse", help="activation ranges of W8A8")
    ap.add_argument("--mixed-epochs", type=int, default=None, help="phase-1 epochs of the mixed model (default --epochs)")
    ap.add_argument("--runs", default="/tmp/fbnas_int_deploy")
    ap.add_argument("--no-ort", action="store_true",
                    help="skip the onnxruntime checks (e.g. where onnxruntime and CUDA torch clash in one process)")
    ap.add_argument("--out", default="bench/results/int_deploy/local.md")
    return ap.parse_args()


def train_fp32_and_w8a8(a, arch8, data, base: dict, runs: Path):
    """The FP32 model and the W8A8 integer-only model (from scratch or fine-tuned from FP32); their metrics."""
    fp32 = train(arch8, data, TrainSettings(**base, quantized=False), runs / "fp32")
    w8_settings = dict(base)
    if a.w8_init == "fp32":
        w8_settings.update(lr=a.lr * a.mixed_lr_scale, init="weights", weights=str(runs / "fp32" / "model.safetensors"))
    w8 = train(arch8, data, TrainSettings(**w8_settings), runs / "w8a8")
    return fp32, w8


def sensitivities(a, space, arch8, data, runs: Path):
    """The ILP's Omega from the trained W8A8 model, and a sentence saying what it measures."""
    if a.sensitivity == "loss":
        unfolded = load_unfolded(runs / "w8a8" / "model_bn.safetensors").to(a.device)
        g = torch.Generator().manual_seed(1)
        idx = torch.randperm(len(data.train), generator=g)[:a.sensitivity_images]
        batches = [(data.train.x[j].to(a.device), data.train.y[j].to(a.device)) for j in idx.split(500)]
        omega = loss_sensitivity(unfolded, len(arch8.layers), space.w_bits, space.a_bits, batches)
        return omega, f"loss rise of the trained W8A8 model per layer and (w, a), {len(idx)} training images"
    folded = load_folded(runs / "w8a8" / "model.safetensors")
    return weight_perturbation(folded, len(arch8.layers), space.w_bits), "weight perturbation of W8A8"


def train_mixed(a, arch, data, base: dict, runs: Path):
    """One mixed-precision model per --act-clip variant: their settings and {run name: (clip, metrics)}."""
    tuned = dict(base, epochs=a.epochs if a.mixed_epochs is None else a.mixed_epochs)
    if a.mixed_init == "w8a8":
        tuned.update(lr=a.lr * a.mixed_lr_scale, init="weights", weights=str(runs / "w8a8" / "model_bn.safetensors"))
    clips = a.act_clip.split(",")
    mixed = {}
    for clip in clips:
        name = "mixed" if len(clips) == 1 else f"mixed_{clip}"
        mixed[name] = (clip, train(arch, data, TrainSettings(**dict(tuned, act_clip=clip)), runs / name))
    return tuned, mixed


def onnxruntime_checks(a, data, runs: Path, names):
    """The accumulator check and the whole-graph checks of each run in `names`; None and {} where skipped."""
    x = data.test.x[:a.ort_samples]
    xg = data.test.x if a.graph_samples <= 0 else data.test.x[:a.graph_samples]
    ort, graphs = {k: None for k in names}, {}
    try:
        if a.no_ort:
            raise ImportError
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime checks skipped (--no-ort or not installed); run `fbnas quantize onnx run=<run dir>` later")
    else:
        for k in ort:
            integer = to_integer(load_folded(runs / k / "model.safetensors"))
            ort[k] = check_with_onnxruntime(integer, x)
            integer = integer.to(a.device)
            graphs[k] = {mode: check_graph(integer, xg, mode, lsb_samples=a.lsb_samples) for mode in ("qlinear", "qdq")}
    return ort, graphs


def header_lines(a, n_test: int, wall: float, source: str, mixed_epochs: int) -> list[str]:
    return [f"# Integer-only deployment, Fashion-MNIST ({n_test} test images), arch {a.ops}",
            "", f"device {a.device}; epochs {a.epochs} + {a.fold_epochs} folded; steps/epoch {a.steps or 'all'}; "
            f"wall {wall:.0f} s", "",
            f"W8A8 activation ranges: {a.w8_act_clip}, "
            + ("trained from scratch; " if a.w8_init == "scratch" else f"fine-tuned from FP32 at lr x {a.mixed_lr_scale}; ")
            + f"ILP limit: {a.limit} <= {a.ratio} x W8A8 ({a.lut_device} LUT for latency); sensitivity: {source}; "
            "mixed model: "
            + (f"fine-tuned from the W8A8 model at lr x {a.mixed_lr_scale}" if a.mixed_init == "w8a8"
               else "trained from scratch") + f", {mixed_epochs} + {a.fold_epochs} folded epochs", ""]


def table_lines(lut_device: str, rows, table, arch8) -> list[str]:
    """The markdown table of the models; `rows`: (name, arch, acc, fake-quant acc, disagreements, ORT check)."""
    lat_w8 = arch_latency(table, arch8)
    lines = [f"| model | bits (w/a per layer) | {lut_device} latency vs W8A8 | BOPs vs W8A8 | acc (integer-only; "
             "FP32: float) | acc fake-quant | int vs fake top-1 disagreements | ORT accumulator mismatches | "
             "ORT logits identical |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, ar, acc, fq, dis, o in rows:
        bits = " ".join(f"{l.w_bits}/{l.a_bits}" for l in ar.layers) if name != "FP32" else "32"
        rel = "" if name == "FP32" else f"{arch_latency(table, ar) / lat_w8:.3f}"
        bops = "" if name == "FP32" else f"{ar.bops() / arch8.bops():.3f}"
        lines.append(f"| {name} | {bits} | {rel} | {bops} | {acc:.2f} | "
                     f"{'' if fq is None else f'{fq:.2f}'} | {'' if dis is None else dis} | "
                     f"{'' if o is None else o['accumulator_mismatches']} | {'' if o is None else o['logits_identical']} |")
    return lines


def footer_lines(fp32: dict, w8: dict, mixed: dict, graphs: dict) -> list[str]:
    lines = ["", f"W8A8 integer - FP32: {w8['acc_integer'] - fp32['acc_float']:+.2f} points; "
             + "; ".join(f"mixed (act clip {clip}) - W8A8: {m['acc_integer'] - w8['acc_integer']:+.2f} points"
                         for clip, m in mixed.values()), "",
             "## onnxruntime whole-model graphs vs the integer-only model", ""]
    for k in graphs:
        lines += [f"- {k}: " + format_graph_check(graphs[k][mode]) for mode in ("qlinear", "qdq")]
    if not graphs:
        lines.append("not run: onnxruntime is not installed here (`fbnas quantize onnx` runs them on any machine)")
    return lines


def main() -> None:
    a = parse_args()
    space = load_space(a.space)
    arch8 = Arch.from_space(space, a.ops.split(","), 8, 8)
    data = load_dataset("fashion_mnist", train_subset=a.train_subset, test_subset=a.test_subset)
    base = dict(epochs=a.epochs, fold_epochs=a.fold_epochs, max_steps_per_epoch=a.steps, batch_size=a.batch_size,
                lr=a.lr, accelerator=a.device, act_clip=a.w8_act_clip)
    runs = Path(a.runs)
    t0 = time.time()
    fp32, w8 = train_fp32_and_w8a8(a, arch8, data, base, runs)
    omega, source = sensitivities(a, space, arch8, data, runs)
    table = get_table(space, a.lut_device)
    key = "latency_ms" if a.limit == "latency" else "bops"
    ilp = ilp_arch(arch8, omega, space.w_bits, space.a_bits, ratios={key: a.ratio}, table=table,
                   device=a.lut_device, source=source)
    ilp.arch.save(runs / "arch_ilp.json")
    tuned, mixed = train_mixed(a, ilp.arch, data, base, runs)
    ort, graphs = onnxruntime_checks(a, data, runs, ("w8a8", *mixed))
    rows = [("FP32", arch8, fp32.get("acc_float"), None, None, None),
            ("W8A8", arch8, w8["acc_integer"], w8["acc_fake_quant"], w8["integer_vs_fake_top1_disagreements"], ort["w8a8"])]
    rows += [(f"ILP mixed, act clip {clip}", ilp.arch, m["acc_integer"], m["acc_fake_quant"],
              m["integer_vs_fake_top1_disagreements"], ort[k]) for k, (clip, m) in mixed.items()]
    lines = (header_lines(a, len(data.test), time.time() - t0, source, tuned["epochs"])
             + table_lines(a.lut_device, rows, table, arch8) + footer_lines(fp32, w8, mixed, graphs))
    text = "\n".join(lines) + "\n"
    atomic_write_text(a.out, text)
    print(text)
    print(json.dumps({"fp32": fp32.get("acc_float"), "w8a8": w8["acc_integer"],
                      **{k: m["acc_integer"] for k, (_, m) in mixed.items()}}))


if __name__ == "__main__":
    main()

"""Do Hessian traces mean something? Quantize the k lowest-trace vs the k highest-trace layers of a trained
Fashion-MNIST child to 2-bit weights (no fine-tuning) and compare test accuracy.

The child is trained in float for a few epochs on CPU, then per-layer traces Tr(H)/n come from
fbnas.hessian.hutchinson_traces on training batches. Post-training quantization: the chosen layers' weights go to
2 bits through Arch.with_bits (per-output-channel symmetric), every other layer stays at 8 bits, activations at
8 bits with ranges calibrated on training batches (BN frozen), no fine-tuning.
HAWQ-V2's own ranking, Omega(2) = Tr(H)/n * ||Q_2(W) - W||^2, is reported beside the trace ranking.

  python bench/hessian_meaning.py                 # ~10 min on 2 CPU cores; writes bench/results/hessian_meaning/local.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fbnas import Arch, build_model, load_space  # noqa: E402
from fbnas.data import load_dataset, make_loader  # noqa: E402
from fbnas.hessian import child_groups, hutchinson_traces, omega  # noqa: E402
from fbnas.io import atomic_write_json, atomic_write_text  # noqa: E402

OPS = ["ir_k3_e3", "ir_k3_e3", "ir_k3_e1", "ir_k5_e3", "ir_k3_e1_g2", "ir_k3_e6"]


@torch.no_grad()
def accuracy(model, data, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        correct += (model(data.x[i:i + batch_size]).argmax(1) == data.y[i:i + batch_size]).sum().item()
    return correct / len(data)


def train(model, data, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    loader = make_loader(data, batch_size, shuffle=True, seed=seed, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * len(loader))
    for ep in range(epochs):
        model.train()
        t0, tot = time.time(), 0.0
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
        print(f"epoch {ep + 1}: train CE {tot / len(loader):.3f} ({time.time() - t0:.0f} s)", flush=True)


@torch.no_grad()
def quantized_copy(arch: Arch, state: dict, low_bits_layers: set[int], bits: int, calib: list):
    """The float weights at the given bits; activation ranges (EMA min/max) observed on calibration batches."""
    wb = [bits if i in low_bits_layers else l.w_bits for i, l in enumerate(arch.layers)]
    model = build_model(arch.with_bits(wb))
    model.load_state_dict(state)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    for x, _ in calib:
        model(x)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=20000)
    ap.add_argument("--test-subset", type=int, default=5000)
    ap.add_argument("--trace-batch-size", type=int, default=64)
    ap.add_argument("--max-probes", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--trace-batches", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST idx files")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "hessian_meaning" / "local"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bundle = load_dataset("fashion_mnist", args.data_root, train_subset=args.train_subset,
                          test_subset=args.test_subset, seed=args.seed)
    arch = Arch.from_space(load_space("fmnist"), OPS, 8, 8)
    model = build_model(arch, quantized=False)
    train(model, bundle.train, args.epochs, args.batch_size, args.lr, args.seed)
    state = model.state_dict()
    acc_float = accuracy(model, bundle.test)
    calib = [b for _, b in zip(range(4), make_loader(bundle.train, 256, shuffle=True, seed=args.seed + 2))]
    acc8 = accuracy(quantized_copy(arch, state, set(), args.bits, calib), bundle.test)
    print(f"test accuracy: float {acc_float:.4f}, w8a8 {acc8:.4f}", flush=True)

    loader = make_loader(bundle.train, args.trace_batch_size, shuffle=True, seed=args.seed + 1, drop_last=True)
    batches = [b for _, b in zip(range(args.trace_batches), loader)]
    t0 = time.time()
    groups = {k: v for k, v in child_groups(model).items() if k.startswith("layers.")}
    res = hutchinson_traces(model, None, batches, groups, target_rel_se=0.05, max_probes=args.max_probes,
                            seed=args.seed)
    print(res.table())
    print(f"traces: {time.time() - t0:.0f} s, engine {res.method}", flush=True)
    tr = {i: res.groups[f"layers.{i}"].trace_per_param for i in range(len(arch.layers))}
    om = {i: omega(tr[i], groups[f"layers.{i}"], args.bits) for i in range(len(arch.layers))}
    by_trace = sorted(tr, key=tr.get)
    by_omega = sorted(om, key=om.get)
    rows = []
    for k in range(1, len(arch.layers) // 2 + 1):
        row = {"k": k}
        for label, order in (("trace", by_trace), ("omega", by_omega)):
            low, high = set(order[:k]), set(order[-k:])
            row[f"{label}_low_layers"], row[f"{label}_high_layers"] = sorted(low), sorted(high)
            row[f"{label}_low_acc"] = accuracy(quantized_copy(arch, state, low, args.bits, calib), bundle.test)
            row[f"{label}_high_acc"] = accuracy(quantized_copy(arch, state, high, args.bits, calib), bundle.test)
        rows.append(row)
        print(row, flush=True)
    out = {"arch_ops": OPS, "epochs": args.epochs, "train_subset": args.train_subset, "test_subset": args.test_subset,
           "float_acc": acc_float, "w8a8_acc": acc8,
           "bits": args.bits, "traces": {f"layers.{i}": res.groups[f"layers.{i}"].__dict__ for i in tr},
           "omega": {f"layers.{i}": om[i] for i in om}, "rows": rows, "engine": res.method}
    lines = [f"# Hessian traces vs {args.bits}-bit quantization damage (Fashion-MNIST child)", "",
             f"Child `{', '.join(OPS)}` (fmnist space), float training for {args.epochs} epochs on "
             f"{args.train_subset or 60000} training images; test accuracy ({args.test_subset or 10000} test images) "
             f"float **{acc_float:.4f}**, w8a8 **{acc8:.4f}**. Traces from {args.trace_batches} x "
             f"{args.trace_batch_size} training images (target rel SE 5%, at most {args.max_probes} probes).", "",
             "| layer | op | Tr(H)/n | rel SE | weights | Omega(2) |", "|---|---|---|---|---|---|"]
    for i in range(len(arch.layers)):
        g = res.groups[f"layers.{i}"]
        lines.append(f"| {i} | {OPS[i]} | {g.trace_per_param:.3e} | {g.rel_se:.3f} | {g.n_params} | {om[i]:.3e} |")
    lines += ["", f"Test accuracy with the k chosen layers' weights at {args.bits} bits (others 8; no fine-tuning):", "",
              "| k | k lowest-trace layers | acc | k highest-trace layers | acc | lowest-Omega | acc | highest-Omega | acc |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['trace_low_layers']} | {r['trace_low_acc']:.4f} | {r['trace_high_layers']} | "
                     f"{r['trace_high_acc']:.4f} | {r['omega_low_layers']} | {r['omega_low_acc']:.4f} | "
                     f"{r['omega_high_layers']} | {r['omega_high_acc']:.4f} |")
    lines += ["", "Reproduce: `python bench/hessian_meaning.py " + " ".join(argv if argv is not None else sys.argv[1:])
              + "`"]
    md = "\n".join(lines) + "\n"
    print(md)
    atomic_write_json(args.out + ".json", out)
    atomic_write_text(args.out + ".md", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

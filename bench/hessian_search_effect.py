"""Does the Hessian penalty change what the search picks? Search with gamma = 0 and gamma > 0 (same seed, data,
latency table) and compare, over the searchable layers of each derived architecture, the layer's Hessian trace
with the weight bits the search chose (Spearman). With the penalty, high-trace layers should keep more bits.

The latency device defaults to bitfusion (a bit-serial accelerator where 2/4-bit pays): its latency term pushes
every layer to low bits, so the bits a layer keeps show what the accuracy and Hessian terms defend. Each layer's
trace is measured on the derived architecture inside the final supernet (fbnas.hessian.hutchinson_traces with the
path fixed); identity layers (no weights) are left out.

  python bench/hessian_search_effect.py                      # CPU, fmnist, a few minutes per search
  python bench/hessian_search_effect.py --accelerator cuda --epochs 8 --steps 0 --train-subset 0
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fbnas.config import HessianConfig, SearchConfig  # noqa: E402
from fbnas.data import load_dataset, make_loader  # noqa: E402
from fbnas.hessian import hutchinson_traces, quantized_weights, supernet_traces  # noqa: E402
from fbnas.io import atomic_write_json, atomic_write_text  # noqa: E402
from fbnas.search import run_search  # noqa: E402
from fbnas.space import load_space  # noqa: E402
from fbnas.supernet import Supernet  # noqa: E402


def layer_traces(run_dir: Path, arch, cfg: SearchConfig, device, seed: int, max_probes: int) -> dict[int, dict]:
    space = load_space(cfg.space)
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    net = Supernet(space, mode=cfg.mode, quantized=cfg.quantized)
    net.load_state_dict(state["supernet"])
    net.to(device)
    choice = [(space.candidates.index(l.op), space.w_bits.index(l.w_bits), space.a_bits.index(l.a_bits))
              for l in arch.layers]
    groups = {f"layers.{l}": quantized_weights(net.mixed_layers[l].ops[i]) for l, (i, _, _) in enumerate(choice)}
    groups = {k: v for k, v in groups.items() if v}
    bundle = load_dataset(cfg.data.name, cfg.data.root, seed=seed, train_subset=cfg.data.train_subset)
    loader = make_loader(bundle.train, 128, shuffle=True, seed=seed + 99, drop_last=True, device=device)
    batches = [b for _, b in zip(range(2), loader)]
    net.fix(choice)
    try:
        res = hutchinson_traces(net, None, batches, groups, target_rel_se=0.1, max_probes=max_probes, seed=seed)
    finally:
        net.fix(None)
    return {int(k.split(".")[1]): {"trace_per_param": g.trace_per_param, "rel_se": g.rel_se, "op": arch.layers[int(
        k.split(".")[1])].op, "w_bits": arch.layers[int(k.split(".")[1])].w_bits} for k, g in res.groups.items()}


def op_level(run_dir: Path, cfg: SearchConfig, device, seed: int, max_probes: int) -> dict:
    """Every op with weights in the final supernet: its trace (measured with it chosen) and the expected weight
    bits of its learned bit distribution, sum_b softmax(beta_w)_b * b (continuous: no ties, defined at gamma 0)."""
    space = load_space(cfg.space)
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    net = Supernet(space, mode=cfg.mode, quantized=cfg.quantized)
    net.load_state_dict(state["supernet"])
    net.to(device)
    bundle = load_dataset(cfg.data.name, cfg.data.root, seed=seed, train_subset=cfg.data.train_subset)
    loader = make_loader(bundle.train, 128, shuffle=True, seed=seed + 99, drop_last=True, device=device)
    batches = [b for _, b in zip(range(2), loader)]
    res = supernet_traces(net, None, batches, target_rel_se=0.1, max_probes=max_probes, min_probes=16, seed=seed)
    with torch.no_grad():
        _, ws, _ = net.probabilities()
        bits = torch.tensor(space.w_bits, dtype=ws.dtype, device=ws.device)
        expected = (ws * bits).sum(-1).cpu()
    out = {}
    for name, g in res.groups.items():
        l, i = int(name.split(".")[1]), int(name.split(".")[3])
        out[name] = {"trace_per_param": g.trace_per_param, "rel_se": g.rel_se, "expected_w_bits": float(expected[l, i])}
    tr = [v["trace_per_param"] for v in out.values()]
    eb = [v["expected_w_bits"] for v in out.values()]
    return {"spearman": float(spearmanr(tr, eb).statistic), "ops": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="fmnist")
    ap.add_argument("--device", default="bitfusion", help="latency device (LUT)")
    ap.add_argument("--gammas", default="0,1,5", help="comma-separated penalty weights (include 0 as the reference)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=60, help="max weight steps per epoch (0: all)")
    ap.add_argument("--train-subset", type=int, default=12000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--refresh-every", type=int, default=40)
    ap.add_argument("--hessian-probes", type=int, default=32)
    ap.add_argument("--trace-probes", type=int, default=200, help="probe cap of the per-layer traces of each result")
    ap.add_argument("--op-trace-probes", type=int, default=64, help="probe cap of the per-op traces of the supernet")
    ap.add_argument("--beta", type=float, default=None, help="latency exponent of the multiplicative objective "
                    "(default: the search default); lower keeps more layers with weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST idx files (default: the system copy)")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--runs", default=str(Path("runs") / "hessian_search_effect"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "hessian_search_effect"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.accelerator.startswith("cuda") else "cpu")
    results = {}
    for gamma in [float(g) for g in args.gammas.split(",")]:
        cfg = SearchConfig(space=args.space, device=args.device, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                           max_steps_per_epoch=args.steps, seed=args.seed, accelerator=args.accelerator,
                           threads=args.threads, progress=False)
        cfg.data.train_subset = args.train_subset
        cfg.data.root = args.data_root
        cfg.data.batch_size = args.batch_size
        if args.beta is not None:
            cfg.objective.beta = args.beta
        cfg.objective.hessian = HessianConfig(gamma=gamma, refresh_every=args.refresh_every,
                                              max_probes=args.hessian_probes, batches=1)
        run_dir = Path(args.runs) / f"gamma_{gamma:g}"
        if (run_dir / "checkpoints" / "last.pt").exists():
            raise SystemExit(f"{run_dir} holds an earlier run: remove it or pass another --runs")
        t0 = time.time()
        res = run_search(cfg, run_dir)
        seconds = time.time() - t0
        layers = layer_traces(run_dir, res.arch, cfg, device, args.seed, args.trace_probes)
        idx = sorted(layers)
        tr = [layers[i]["trace_per_param"] for i in idx]
        bits = [layers[i]["w_bits"] for i in idx]
        rho = spearmanr(tr, bits).statistic if len(set(bits)) > 1 and len(set(tr)) > 1 else float("nan")
        ops = op_level(run_dir, cfg, device, args.seed, args.op_trace_probes)
        results[gamma] = {"spearman": rho, "layers": layers, "seconds": seconds, "latency_ms": res.latency_ms,
                          "val_acc": res.arch.predicted.get("val_acc_in_supernet"), "run_dir": str(run_dir),
                          "op_spearman": ops["spearman"], "ops": ops["ops"]}
        print(f"gamma={gamma:g}: Spearman(trace, w_bits) = {rho:.3f} over {len(idx)} layers, bits {bits}; over "
              f"{len(ops['ops'])} supernet ops, Spearman(trace, E[w bits]) = {ops['spearman']:.3f} "
              f"({seconds:.0f} s search)", flush=True)
    lines = [f"# Effect of the Hessian penalty on the searched bits ({args.space}, latency device {args.device})", "",
             f"Search: {args.epochs} epochs ({args.warmup_epochs} warm-up), <= {args.steps or 'all'} steps/epoch, "
             f"{args.train_subset or 'all'} training images, batch {args.batch_size}, seed {args.seed}; penalty "
             f"refreshed every {args.refresh_every} steps with <= {args.hessian_probes} probes per op"
             + (f"; latency exponent beta {args.beta}" if args.beta is not None else "") + ".", "",
             "| gamma | Spearman(layer trace, chosen w bits) of the derived arch | Spearman(op trace, expected w bits) "
             "over all supernet ops | supernet val acc | latency (ms) |", "|---|---|---|---|---|"]
    for gamma, r in results.items():
        rho = "undefined (all layers same bits)" if math.isnan(r["spearman"]) else f"{r['spearman']:.3f}"
        lines.append(f"| {gamma:g} | {rho} | {r['op_spearman']:.3f} ({len(r['ops'])} ops) | {r['val_acc']} | "
                     f"{r['latency_ms']:.4f} |")
    for gamma, r in results.items():
        lines += ["", f"gamma = {gamma:g}:", "", "| layer | op | Tr(H)/n | rel SE | w bits |", "|---|---|---|---|---|"]
        for i, l in sorted(r["layers"].items()):
            lines.append(f"| {i} | {l['op']} | {l['trace_per_param']:.3e} | {l['rel_se']:.2f} | {l['w_bits']} |")
    cmd = " ".join(["python bench/hessian_search_effect.py"] + (argv if argv is not None else sys.argv[1:]))
    lines += ["", f"Reproduce: `{cmd}`"]
    md = "\n".join(lines) + "\n"
    print(md)
    atomic_write_json(args.out + ".json", {str(k): v for k, v in results.items()})
    atomic_write_text(args.out + ".md", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

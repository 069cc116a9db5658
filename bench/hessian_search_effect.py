"""Does the Hessian penalty change what the search picks? Search with gamma = 0 and gamma > 0 (same seed, data,
latency table) and compare, over the searchable layers of each derived architecture, the layer's Hessian trace
with the weight bits the search chose (Spearman). With the penalty, high-trace layers should keep more bits.

The latency device defaults to bitfusion (a bit-serial accelerator where 2/4-bit pays): its latency term pushes
every layer to low bits, so the bits a layer keeps show what the accuracy and Hessian terms defend. Each layer's
trace is measured on the derived architecture inside the final supernet (fbnas.hessian.hutchinson_traces with the
path fixed); identity layers (no weights) are left out.

--fixed-op OP searches bits only: every searchable layer of the space gets OP as its one candidate (a copy of the
space written under --runs, priced with the space's own latency table), so every layer of the derived
architecture has weights and the layer-level Spearman runs over all of them. search_spaces/fmnist_deep.yaml has
14 such layers (fmnist: 6).

  python bench/hessian_search_effect.py                      # CPU, fmnist, a few minutes per search
  python bench/hessian_search_effect.py --accelerator cuda --epochs 8 --steps 0 --train-subset 0
  python bench/hessian_search_effect.py --space fmnist_deep --fixed-op ir_k3_e3 --gammas 0,0.05,0.15  # bits only
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fbnas.blocks import build_op  # noqa: E402
from fbnas.checkpoint import load_checkpoint  # noqa: E402
from fbnas.config import HessianConfig, SearchConfig  # noqa: E402
from fbnas.data import load_dataset, make_loader  # noqa: E402
from fbnas.hessian import hutchinson_traces, quantized_weights, supernet_traces  # noqa: E402
from fbnas.io import atomic_write_json, atomic_write_text  # noqa: E402
from fbnas.latency import load_device  # noqa: E402
from fbnas.latency.builder import table_path  # noqa: E402
from fbnas.search import CHECKPOINT_FORMAT, run_search  # noqa: E402
from fbnas.space import load_space, space_from_dict  # noqa: E402
from fbnas.supernet import Supernet, has_quantized_weights  # noqa: E402


def fixed_op_space(base: str, op: str, out_dir: Path) -> str:
    """Space `base` with `op` as the only candidate (a bits-only search), written to out_dir; its path."""
    space = load_space(base)
    raw = {**space.to_dict(), "name": f"{space.name}_{op}", "candidates": [op],
           "description": f"{space.name} with every searchable layer fixed to {op}: only the bits are searched"}
    path = out_dir / f"{raw['name']}.yaml"
    fixed = space_from_dict(raw, str(path))
    for layer in fixed.layers():
        if not has_quantized_weights(build_op(op, layer.c_in, layer.c_out, layer.stride)):
            raise SystemExit(f"--fixed-op {op} has no weights at layer {layer.index} of {base}: pick an op with weights")
    atomic_write_text(path, yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def base_table(space: str, device: str) -> str | None:
    """The latency table of the space the bits-only copy was made from (it holds every key of the copy)."""
    path = table_path(load_space(space).name, load_device(device).name)
    return str(path) if path.is_file() else None


def layer_traces(run_dir: Path, arch, cfg: SearchConfig, device, seed: int, max_probes: int) -> dict[int, dict]:
    space = load_space(cfg.space)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt", CHECKPOINT_FORMAT, "search checkpoint")
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
    bits of its learned bit distribution, sum_b softmax(w_bit_logits)_b * b (continuous: no ties, defined at gamma 0)."""
    space = load_space(cfg.space)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt", CHECKPOINT_FORMAT, "search checkpoint")
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
    ap.add_argument("--fixed-op", default=None, help="search bits only: every searchable layer gets this op (one "
                    "with weights, e.g. ir_k3_e3) as its only candidate")
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
    ap.add_argument("--latency-target", type=float, default=None, metavar="MS",
                    help="objective kind=target: keep E[latency] under MS (dual ascent), so that searches with "
                         "different gammas end at about the same latency")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST idx files (default: the system copy)")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--runs", default=str(Path("runs") / "hessian_search_effect"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "hessian_search_effect" / "local"))
    ap.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                    help="instead of searching: combine result files named *_s<seed>_b<beta>_g<gamma>.json into one "
                         "table (--out prefix)")
    args = ap.parse_args(argv)
    if args.summarize:
        summarize(args.summarize, args.out)
        return 0
    device = torch.device("cuda" if args.accelerator.startswith("cuda") else "cpu")
    space, lut = args.space, None
    if args.fixed_op:
        Path(args.runs).mkdir(parents=True, exist_ok=True)
        space, lut = fixed_op_space(args.space, args.fixed_op, Path(args.runs)), base_table(args.space, args.device)
    results = {}
    for gamma in [float(g) for g in args.gammas.split(",")]:
        r = results[gamma] = search_effect(args, gamma, space, lut, device)
        bits = [l["w_bits"] for _, l in sorted(r["layers"].items())]
        print(f"gamma={gamma:g}: Spearman(trace, w_bits) = {r['spearman']:.3f} over {len(bits)} layers with weights "
              f"(of {r['n_layers']}), bits {bits}; over {len(r['ops'])} supernet ops, Spearman(trace, E[w bits]) = "
              f"{r['op_spearman']:.3f} ({r['seconds']:.0f} s search)", flush=True)
        write_report(args, results, argv)  # after every gamma: a run cut short keeps the finished ones
    print(report(args, results, argv))
    return 0


def search_effect(args, gamma: float, space: str, lut: str | None, device) -> dict:
    """Search with penalty weight gamma; the derived architecture's layer traces and bits, and the op level."""
    cfg = SearchConfig(space=space, device=args.device, lut=lut, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                       max_steps_per_epoch=args.steps, seed=args.seed, accelerator=args.accelerator,
                       threads=args.threads, progress=False)
    cfg.data.train_subset = args.train_subset
    cfg.data.root = args.data_root
    cfg.data.batch_size = args.batch_size
    if args.beta is not None:
        cfg.objective.beta = args.beta
    if args.latency_target is not None:
        cfg.objective.kind, cfg.objective.limit_ms = "target", args.latency_target
    cfg.objective.hessian = HessianConfig(gamma=gamma, refresh_every=args.refresh_every,
                                          max_probes=args.hessian_probes, batches=1)
    run_dir = Path(args.runs) / f"gamma_{gamma:g}"
    if (run_dir / "checkpoints" / "last.pt").exists():
        raise SystemExit(f"{run_dir} holds an earlier run: remove it or pass another --runs")
    t0 = time.time()
    res = run_search(cfg, run_dir)
    seconds = time.time() - t0
    layers = layer_traces(run_dir, res.arch, cfg, device, args.seed, args.trace_probes)
    tr = [l["trace_per_param"] for _, l in sorted(layers.items())]
    bits = [l["w_bits"] for _, l in sorted(layers.items())]
    rho = spearmanr(tr, bits).statistic if len(set(bits)) > 1 and len(set(tr)) > 1 else float("nan")
    ops = op_level(run_dir, cfg, device, args.seed, args.op_trace_probes)
    return {"spearman": rho, "layers": layers, "seconds": seconds, "latency_ms": res.latency_ms,
            "val_acc": res.arch.predicted.get("val_acc_in_supernet"), "run_dir": str(run_dir),
            "op_spearman": ops["spearman"], "ops": ops["ops"], "space": space, "lut": lut,
            "n_layers": len(res.arch.layers)}


def report(args, results: dict, argv) -> str:
    only = f", bits only: every layer {args.fixed_op}" if args.fixed_op else ""
    lines = [f"# Effect of the Hessian penalty on the searched bits ({args.space}{only}, latency device "
             f"{args.device})", "",
             f"Search: {args.epochs} epochs ({args.warmup_epochs} warm-up), <= {args.steps or 'all'} steps/epoch, "
             f"{args.train_subset or 'all'} training images, batch {args.batch_size}, seed {args.seed}; penalty "
             f"refreshed every {args.refresh_every} steps with <= {args.hessian_probes} probes per op"
             + (f"; latency exponent beta {args.beta}" if args.beta is not None else "")
             + (f"; latency target {args.latency_target} ms" if args.latency_target is not None else "") + ".", "",
             "| gamma | Spearman(layer trace, chosen w bits) of the derived arch | Spearman(op trace, expected w bits) "
             "over all supernet ops | supernet val acc | latency (ms) | search (s) |", "|---|---|---|---|---|---|"]
    for gamma, r in results.items():
        rho = "undefined (all layers same bits)" if math.isnan(r["spearman"]) else f"{r['spearman']:.3f}"
        lines.append(f"| {gamma:g} | {rho} ({len(r['layers'])} of {r['n_layers']} layers) | {r['op_spearman']:.3f} "
                     f"({len(r['ops'])} ops) | {r['val_acc']} | {r['latency_ms']:.4f} | {r['seconds']:.0f} |")
    for gamma, r in results.items():
        lines += ["", f"gamma = {gamma:g}:", "", "| layer | op | Tr(H)/n | rel SE | w bits |", "|---|---|---|---|---|"]
        for i, l in sorted(r["layers"].items()):
            lines.append(f"| {i} | {l['op']} | {l['trace_per_param']:.3e} | {l['rel_se']:.2f} | {l['w_bits']} |")
    cmd = " ".join(["python bench/hessian_search_effect.py"] + (argv if argv is not None else sys.argv[1:]))
    lines += ["", f"Reproduce: `{cmd}`"]
    return "\n".join(lines) + "\n"


def write_report(args, results: dict, argv) -> None:
    atomic_write_json(args.out + ".json", {str(k): v for k, v in results.items()})
    atomic_write_text(args.out + ".md", report(args, results, argv))


def summarize(paths: list[str], out: str) -> None:
    """One table over many runs (seeds x latency exponents x gammas), from files named *_s<seed>_b<beta>_g<gamma>
    .json as `bash bench/gpu.sh heff` writes them; mean Spearman per (beta, gamma) over seeds."""
    import re
    import statistics

    rows = []
    for p in paths:
        m = re.search(r"_s(\d+)_b([^_]+)_g([0-9.]+)\.json$", p)
        if not m:
            raise SystemExit(f"{p}: name does not end in _s<seed>_b<beta>_g<gamma>.json")
        for gamma, r in json.loads(Path(p).read_text()).items():
            if gamma in ("command", "hardware"):  # the header of a file kept in bench/results
                continue
            bits = [l["w_bits"] for _, l in sorted(r["layers"].items(), key=lambda kv: int(kv[0]))]
            rows.append({"seed": int(m[1]), "beta": m[2], "gamma": float(gamma), "spearman": r["spearman"],
                         "op_spearman": r["op_spearman"], "w_bits": bits, "val_acc": r["val_acc"],
                         "latency_ms": r["latency_ms"], "n_layers": r["n_layers"]})
    rows.sort(key=lambda r: (r["beta"], r["gamma"], r["seed"]))
    lines = ["# Hessian penalty vs searched bits: combined runs", "",
             "beta: the multiplicative objective's latency exponent (default 0.6), or t<ms>: objective kind=target "
             "with that latency limit. Runs: `SEEDS=... BETAS=... GAMMAS=... bash bench/gpu.sh heff` "
             "(bits-only: --space fmnist_deep --fixed-op ir_k3_e3, bitfusion, 6 epochs, 100 steps/epoch); this table: "
             "`python bench/hessian_search_effect.py --summarize <their json files> --out <prefix>`. Spearman is "
             "nan where every layer got the same bits.", "",
             "| beta | gamma | seed | Spearman(layer trace, w bits) | Spearman(op trace, E[w bits]) | w bits per layer "
             "| val acc (supernet) | latency (ms) |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    lines += [f"| {r['beta']} | {r['gamma']:g} | {r['seed']} | {r['spearman']:.3f} | {r['op_spearman']:.3f} | "
              f"{' '.join(map(str, r['w_bits']))} | {r['val_acc']} | {r['latency_ms']:.4f} |" for r in rows]
    lines += ["", "| beta | gamma | seeds | mean Spearman(layer) | mean Spearman(op) | mean w bits |",
              "|---|---:|---:|---:|---:|---:|"]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["beta"], r["gamma"]), []).append(r)
    for (beta, gamma), rs in groups.items():
        defined = [r["spearman"] for r in rs if r["spearman"] == r["spearman"]]
        lines.append(f"| {beta} | {gamma:g} | {len(rs)} | "
                     f"{statistics.mean(defined) if defined else float('nan'):.3f} ({len(defined)} defined) | "
                     f"{statistics.mean(r['op_spearman'] for r in rs):.3f} | "
                     f"{statistics.mean(b for r in rs for b in r['w_bits']):.2f} |")
    atomic_write_text(out + ".md", "\n".join(lines) + "\n")
    atomic_write_json(out + ".json", rows)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

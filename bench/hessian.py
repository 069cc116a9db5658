"""Speed of the per-layer Hutchinson estimator against a PyHessian-style loop, in one run.

Both estimate Tr(H_g)/n_g for every layer of an fbnet_cifar100 child (stem, 22 searchable layers, head) and stop
when every layer's relative standard error is <= --target (10%), checked every 16 probes per batch, on the same
batches. The PyHessian-style baseline draws one Rademacher vector over all the layers' weights per probe and
reuses the gradient graph (autograd.grad(grads, params, v, retain_graph=True)), with per-layer dot products.
Ours: fbnas.hessian.hutchinson_traces (engine chosen by timing; converged layers stop drawing probes).
Also reported: the cost of one probe (Hessian-vector product) relative to one forward+backward.

  python bench/hessian.py --device cuda            # the H100 numbers
  python bench/hessian.py --device cpu --small     # a quick check on a CPU
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fbnas import Arch, build_model, load_space  # noqa: E402
from fbnas.data import synthetic  # noqa: E402
from fbnas.hessian import child_groups, float_eval_mode, hutchinson_traces  # noqa: E402
from fbnas.io import atomic_write_json, atomic_write_text  # noqa: E402

ROUND = 16


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_child(space_name: str, device, train_steps: int, batch_size: int, seed: int):
    """A deterministic mixed child of the space, briefly trained on a synthetic task (so BN statistics and
    curvature are those of a network that has learned something, not of the initialisation)."""
    space = load_space(space_name)
    cands = [c for c in space.candidates]
    ops = [cands[(3 * i + 1) % len(cands)] for i in range(space.num_layers)]
    arch = Arch.from_space(space, ops, 8, 8)
    torch.manual_seed(seed)
    model = build_model(arch, quantized=False).to(device)
    train, _ = synthetic(max(batch_size * 8, 512), 64, space.num_classes, space.in_channels, space.input_size, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(train_steps):
        idx = torch.randint(0, len(train), (batch_size,), generator=g)
        x, y = train.x[idx].to(device), train.y[idx].to(device)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    idx = torch.randperm(len(train), generator=g)
    return arch, model, train, idx


def time_forward_backward(model, batch, params, repeats: int, device) -> float:
    x, y = batch
    times = []
    with float_eval_mode(model):
        for i in range(repeats + 2):
            sync(device)
            t0 = time.perf_counter()
            torch.autograd.grad(F.cross_entropy(model(x), y), params)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pyhessian_style(model, batches, groups, target: float, max_probes: int, min_probes: int, seed: int, device):
    """One global Rademacher vector per probe over every layer's weights, gradient graph reused, per-layer dots."""
    names = list(groups)
    params = [p for n in names for p in groups[n]]
    owner = torch.tensor([k for k, n in enumerate(names) for _ in groups[n]], device=device)
    t0 = time.perf_counter()
    with float_eval_mode(model):
        graphs = []
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            graphs.append(torch.autograd.grad(loss, params, create_graph=True))
        gen = torch.Generator(device=device).manual_seed(seed)
        sums = torch.zeros(len(batches), len(names), dtype=torch.float64, device=device)
        sq = torch.zeros_like(sums)
        n = 0
        while True:
            for b, grads in enumerate(graphs):
                for _ in range(ROUND):
                    v = [torch.randint(0, 2, p.shape, generator=gen, device=device, dtype=p.dtype) * 2 - 1
                         for p in params]
                    hv = torch.autograd.grad(grads, params, v, retain_graph=True)
                    dots = torch.stack([(a * h).sum() for a, h in zip(v, hv)]).double()
                    per_layer = torch.zeros(len(names), dtype=torch.float64, device=device).index_add_(0, owner, dots)
                    sums[b] += per_layer
                    sq[b] += per_layer ** 2
            n += ROUND
            mean_b = sums / n
            var_b = (sq - n * mean_b ** 2) / (n - 1)
            mean = mean_b.mean(0)
            se = (var_b / n).sum(0).sqrt() / len(batches)
            rel = (se / mean.abs()).cpu()
            if (n * len(batches) >= min_probes and bool((rel <= target).all())) or n * len(batches) >= max_probes:
                break
    seconds = time.perf_counter() - t0
    sizes = {k: sum(p.numel() for p in groups[k]) for k in names}
    return {"seconds": seconds, "probes": n * len(batches), "max_rel_se": float(rel.max()),
            "trace_per_param": {k: float(mean[i]) / sizes[k] for i, k in enumerate(names)},
            "rel_se": {k: float(rel[i]) for i, k in enumerate(names)}}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--space", default="fbnet_cifar100")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.10)
    ap.add_argument("--max-probes", type=int, default=6000)
    ap.add_argument("--min-probes", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="auto", help="our engine: auto | loop | batched:K | func:K")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--small", action="store_true", help="CPU check: fmnist space, batch 16, 1 batch, 40 steps")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "hessian_speed" / "local"),
                    help="writes <out>.json and <out>.md")
    args = ap.parse_args(argv)
    if args.small:
        args.space, args.batch_size, args.batches, args.train_steps = "fmnist", 16, 1, 40
        args.max_probes = min(args.max_probes, 1500)
    return args


def split_batches(data, order, batch_size: int, n_batches: int, device):
    """The first n_batches consecutive batches of `order` over `data`, on `device`."""
    return [(data.x[order[i * batch_size:(i + 1) * batch_size]].to(device),
             data.y[order[i * batch_size:(i + 1) * batch_size]].to(device)) for i in range(n_batches)]


def run_ours(model, batches, groups, args, device):
    """fbnas.hessian.hutchinson_traces to the same target; returns its result and its wall time in seconds."""
    sync(device)
    t0 = time.perf_counter()
    ours = hutchinson_traces(model, None, batches, groups, target_rel_se=args.target, max_probes=args.max_probes,
                             min_probes=args.min_probes, seed=args.seed + 1, method=args.method, device=device)
    sync(device)
    return ours, time.perf_counter() - t0


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def build_results(args, device, groups, params, fb: float, base: dict, ours, ours_s: float) -> dict:
    """The JSON record of one run (without the per-layer table)."""
    engine_costs = ours.settings.get("engine_seconds_per_probe", {})
    per_probe = engine_costs.get(ours.method)
    base_per_probe = base["seconds"] / base["probes"]
    agree = max(abs(ours.groups[k].trace_per_param - base["trace_per_param"][k]) /
                math.hypot(ours.groups[k].se, base["trace_per_param"][k] * base["rel_se"][k]) for k in groups)
    return {
        "device": device_name(device),
        "torch": torch.__version__, "space": args.space, "layers": len(groups), "params": sum(p.numel() for p in params),
        "batch_size": args.batch_size, "batches": args.batches, "target_rel_se": args.target,
        "forward_backward_ms": fb * 1e3,
        "baseline": {"seconds": base["seconds"], "probes": base["probes"], "max_rel_se": base["max_rel_se"],
                     "ms_per_probe": base_per_probe * 1e3, "probe_over_fb": base_per_probe / fb},
        "ours": {"seconds": ours_s, "engine": ours.method, "probe_vectors": ours.n_hvp,
                 "max_rel_se": max(g.rel_se for g in ours.groups.values()),
                 "converged": ours.converged,
                 "ms_per_probe_engine": None if per_probe is None else per_probe * 1e3,
                 "probe_over_fb": None if per_probe is None else per_probe / fb,
                 "engine_ms_per_probe": {k: v * 1e3 for k, v in engine_costs.items()},
                 "ms_per_probe_overall": ours_s / max(ours.n_hvp, 1) * 1e3,
                 "engine_selection_seconds": ours.settings.get("engine_selection_seconds")},
        "speedup": base["seconds"] / ours_s,
        # a run stopped by the cap is extrapolated to the target with SE ~ 1/sqrt(probes)
        "baseline_seconds_to_target": base["seconds"] * max(1.0, (base["max_rel_se"] / args.target) ** 2),
        "ours_seconds_to_target": ours_s * max(1.0, (max(g.rel_se for g in ours.groups.values()) / args.target) ** 2),
        "max_disagreement_in_se": agree,
    }


def summary_lines(args, res: dict, fb: float, ours_method: str, argv) -> list[str]:
    """The markdown report down to its reproduce line."""
    base, ours = res["baseline"], res["ours"]
    n_layers = res["layers"]
    return [
        f"# Hessian trace speed: ours vs PyHessian-style loop ({res['device']})", "",
        f"{args.space} child, {n_layers} layers, {res['params']:,} weights, {args.batches} x {args.batch_size} "
        f"images, target relative SE {args.target:.0%} on every layer.", "",
        "| estimator | time to target (s) | probe vectors | max rel SE | ms / probe | probe / (fwd+bwd) |",
        "|---|---|---|---|---|---|",
        f"| PyHessian-style (global v, graph reused) | {base['seconds']:.2f} | {base['probes']} | "
        f"{base['max_rel_se']:.3f} | {base['ms_per_probe']:.2f} | {base['probe_over_fb']:.2f} |",
        f"| fbnas ({ours_method}, per-layer stopping) | {ours['seconds']:.2f} | {ours['probe_vectors']} | "
        f"{ours['max_rel_se']:.3f} | {ours['ms_per_probe_engine'] or float('nan'):.2f} | "
        f"{ours['probe_over_fb'] or float('nan'):.2f} |", "",
        f"Speed-up in wall time: **{res['speedup']:.2f}x**; at equal error (every layer at {args.target:.0%}; a run "
        f"stopped by the probe cap is extrapolated with SE ~ 1/sqrt(probes)): "
        f"**{res['baseline_seconds_to_target'] / res['ours_seconds_to_target']:.2f}x** "
        f"({res['baseline_seconds_to_target']:.1f} s vs {res['ours_seconds_to_target']:.1f} s).",
        f"One forward+backward: {fb * 1e3:.2f} ms. "
        f"Engine timings per probe (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in ours['engine_ms_per_probe'].items())
        + (f" (engine choice took {ours['engine_selection_seconds']:.1f} s of our time)"
           if ours['engine_selection_seconds'] is not None else ""),
        f"Largest disagreement between the two estimates: {res['max_disagreement_in_se']:.2f} combined SE.", "",
        "Reproduce: `python bench/hessian.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "",
    ]


def layer_table(groups, base: dict, ours) -> tuple[list[str], dict]:
    """The per-layer markdown table and its JSON form."""
    lines = [
        "| layer | Tr(H)/n (ours) | rel SE (ours) | Tr(H)/n (PyHessian-style) | rel SE (PyHessian-style) |",
        "|---|---:|---:|---:|---:|",
    ] + [f"| {k} | {ours.groups[k].trace_per_param:.4e} | {ours.groups[k].rel_se:.3f} | "
         f"{base['trace_per_param'][k]:.4e} | {base['rel_se'][k]:.3f} |" for k in groups]
    table = {k: {"ours": ours.groups[k].trace_per_param, "ours_rel_se": ours.groups[k].rel_se,
                 "baseline": base["trace_per_param"][k], "baseline_rel_se": base["rel_se"][k]}
             for k in groups}
    return lines, table


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    arch, model, data, order = make_child(args.space, device, args.train_steps, args.batch_size, args.seed)
    batches = split_batches(data, order, args.batch_size, args.batches, device)
    groups = {k: v for k, v in child_groups(model).items() if v}
    params = [p for ps in groups.values() for p in ps]
    fb = time_forward_backward(model, batches[0], params, 10, device)

    print(f"{args.space} child: {len(groups)} layers, forward+backward {fb * 1e3:.2f} ms", flush=True)
    base = pyhessian_style(model, batches, groups, args.target, args.max_probes, args.min_probes, args.seed, device)
    print(f"PyHessian-style: {base['seconds']:.2f} s, {base['probes']} probes, max rel SE {base['max_rel_se']:.3f}",
          flush=True)
    ours, ours_s = run_ours(model, batches, groups, args, device)
    res = build_results(args, device, groups, params, fb, base, ours, ours_s)
    table_lines, res["layers_table"] = layer_table(groups, base, ours)
    md = "\n".join(summary_lines(args, res, fb, ours.method, argv) + table_lines) + "\n"
    print(md)
    atomic_write_json(args.out + ".json", res)
    atomic_write_text(args.out + ".md", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

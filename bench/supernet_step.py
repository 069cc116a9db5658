"""One search step (forward, loss, backward, weight SGD + arch Adam updates) of the fbnet_cifar100 supernet:
the default configuration (soft ops, hard bits) and every other mode vs an all-paths fp32 FBNet-style reference supernet (soft Gumbel,
every candidate computed, no quantization, no AMP), all measured in this run. Each configuration runs in its
own process so peak memory is its own. Prints images/s, peak memory and the ratios to the reference.

    python bench/supernet_step.py --device cuda --batch 256          # the H100 target run
    python bench/supernet_step.py --device cpu --batch 32 --steps 3  # a quick CPU check
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = {
    # name: (op mode, quantized, bf16 autocast, channels_last, bit_sampling)
    "reference_fp32_all_paths": ("soft", False, False, False, "soft"),
    "fbnas_default": ("soft", True, True, False, "hard"),       # `fbnas search` defaults: soft ops, hard bits
    "fbnas_default_channels_last": ("soft", True, True, True, "hard"),
    "fbnas_soft_bits": ("soft", True, True, False, "soft"),     # soft ops, soft (EdMIPS-mixed) bits
    "fbnas_hard_bits": ("hard", True, True, False, "hard"),     # one path per step (mode=hard)
    "fbnas_two_path": ("two_path", True, True, False, "hard"),  # two mixed paths per step (mode=two_path)
    "fbnas_hard_bits_channels_last": ("hard", True, True, True, "hard"),
    "fbnas_hard_bits_fp32": ("hard", True, False, False, "hard"),
}


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def build_step(name: str, args: dict, dev):
    """The supernet of configuration `name` with its optimizers and one fixed batch; returns (net, space, step,
    amp, channels_last), `step` running one search step and the two flags as in effect on `dev`."""
    import torch
    import torch.nn.functional as F

    from fbnas import load_space
    from fbnas.latency import fixed_latency, get_table, latency_matrix
    from fbnas.objective import MultiplicativePenalty
    from fbnas.supernet import Supernet, sample_cost

    mode, quantized, amp, channels_last, bit_sampling = CONFIGS[name]
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    space = load_space(args["space"])
    table = get_table(space, args["lut_device"])
    lat_m, lat_fixed = latency_matrix(table, space).to(dev), fixed_latency(table, space)
    net = Supernet(space, mode=mode, quantized=quantized, bit_sampling=bit_sampling).to(dev)
    channels_last = channels_last and dev.type == "cuda"
    amp = amp and dev.type == "cuda"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    fused = dev.type == "cuda"
    w_opt = torch.optim.SGD(net.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)  # unsampled ops have no grad: no fused SGD
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=0.01, weight_decay=5e-4, fused=fused)
    penalty = MultiplicativePenalty(ref_ms=float(lat_m.mean(dim=(1, 2, 3)).sum()) + lat_fixed)
    b, size = args["batch"], space.input_size
    x = torch.randn(b, space.in_channels, size, size, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, space.num_classes, (b,), device=dev)

    def step():
        w_opt.zero_grad(set_to_none=True)
        a_opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x)
        loss = penalty(F.cross_entropy(logits.float(), y), sample_cost(net, lat_m) + lat_fixed)
        loss.backward()
        w_opt.step()
        a_opt.step()

    return net, space, step, amp, channels_last


def warm_up(net, space, step, warmup: int, dev) -> None:
    # steady state of a long search: every candidate's shapes have been seen (cuDNN autotuned) once
    n_ops = len(space.candidates)
    for i in range(n_ops):
        net.fix([(i, len(space.w_bits) - 1, len(space.a_bits) - 1)] * len(net.mixed_layers))
        step()
    net.fix(None)
    for _ in range(warmup):
        step()
    sync(dev)


def count_host_syncs(step, dev):
    """The host<->device synchronisations of one CUDA step (each one stalls the pipeline) and their 8 commonest
    sites."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode("default")
    synced = [w for w in caught if "synchroniz" in str(w.message)]
    where: dict[str, int] = {}
    for w in synced:
        key = f"{Path(w.filename).name}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    sync_sites = sorted(where.items(), key=lambda kv: -kv[1])[:8]
    sync(dev)
    return len(synced), sync_sites


def print_profile(name: str, step, dev) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(f"--- profile of {name} (3 steps) ---\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
          + "\n" + prof.key_averages().table(sort_by=key, row_limit=12), flush=True)


def timed_steps(step, steps: int, dev):
    """Wall seconds of `steps` steps, and the peak memory (GiB) with how it was measured."""
    import torch

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    dt = time.perf_counter() - t0
    if dev.type == "cuda":
        return dt, torch.cuda.max_memory_allocated() / 2 ** 30, "cuda max_memory_allocated"
    return dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "process max RSS"


def measure(name: str, args: dict, queue) -> None:
    import torch

    mode, quantized, _, _, bit_sampling = CONFIGS[name]
    dev = torch.device(args["device"])
    net, space, step, amp, channels_last = build_step(name, args, dev)
    warm_up(net, space, step, args["warmup"], dev)
    host_syncs, sync_sites = None, []
    if dev.type == "cuda":
        host_syncs, sync_sites = count_host_syncs(step, dev)
    if args["profile"]:
        print_profile(name, step, dev)
    dt, peak, mem_kind = timed_steps(step, args["steps"], dev)
    b = args["batch"]
    queue.put({"config": name, "mode": mode, "bit_sampling": bit_sampling, "quantized": quantized, "bf16_autocast": amp, "channels_last": channels_last,
               "images_per_s": args["steps"] * b / dt, "step_ms": 1000 * dt / args["steps"],
               "peak_mem_gib": peak, "memory": mem_kind, "host_syncs_per_step": host_syncs,
               "sync_sites": sync_sites})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--space", default="fbnet_cifar100")
    ap.add_argument("--lut-device", default="sd835")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table per configuration")
    args = vars(ap.parse_args())
    ctx = mp.get_context("spawn")
    results = []
    for name in args["configs"].split(","):
        q = ctx.Queue()
        p = ctx.Process(target=measure, args=(name, args, q))
        p.start()
        p.join()
        if p.exitcode != 0:
            print(f"{name}: failed (exit {p.exitcode})", file=sys.stderr)
            continue
        results.append(q.get())
        r = results[-1]
        print(f"{name}: {r['images_per_s']:.1f} images/s, {r['step_ms']:.1f} ms/step, {r['peak_mem_gib']:.2f} GiB, "
              f"host syncs per step {r['host_syncs_per_step']} {r['sync_sites']}", flush=True)
    ref = next((r for r in results if r["config"] == "reference_fp32_all_paths"), None)
    print(f"space {args['space']}, batch {args['batch']}, device {args['device']}, {args['steps']} timed steps")
    print(f"{'config':<26} {'images/s':>10} {'step ms':>9} {'peak GiB':>9} {'speed x':>8} {'mem x':>7}")
    for r in results:
        if ref:
            r["speedup_vs_reference"] = r["images_per_s"] / ref["images_per_s"]
            r["memory_vs_reference"] = r["peak_mem_gib"] / ref["peak_mem_gib"]
        print(f"{r['config']:<26} {r['images_per_s']:>10.1f} {r['step_ms']:>9.1f} {r['peak_mem_gib']:>9.2f} "
              f"{r.get('speedup_vs_reference', float('nan')):>8.2f} {r.get('memory_vs_reference', float('nan')):>7.3f}")
    if args["out"]:
        from fbnas.io import atomic_write_json

        import torch

        env = {"torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if args["device"].startswith("cuda") else "cpu"}
        atomic_write_json(args["out"], {"settings": args, "environment": env, "results": results})


if __name__ == "__main__":
    main()

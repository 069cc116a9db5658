"""One search step (forward, loss, backward, weight SGD + arch Adam updates) of the fbnet_cifar100 supernet:
the default configuration (soft ops, hard bits) and every other mode vs an all-paths fp32 FBNet-style reference supernet (soft Gumbel,
every candidate computed, no quantization, no AMP), all measured in this run. Each configuration runs in its
own process so peak memory is its own. Prints images/s, peak memory and the ratios to the reference; on a GPU
also the GPU's own time per step (the sum of its kernels' durations, from the profiler, over separate steps)
and how it splits between BatchNorm, depthwise and other kernels: a step whose wall time is well above its
GPU time is bound by the host (kernel launches), one close to it by the GPU's kernels.

    python bench/supernet_step.py --device cuda --batch 256 --steps 8 --warmup 2  # the GPU target run
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
    # name: (op mode, quantized, autocast dtype (None: fp32), channels_last, bit_sampling, CUDA graph)
    "reference_fp32_all_paths": ("soft", False, None, False, "soft", False),
    "reference_fp32_all_paths_graph": ("soft", False, None, False, "soft", True),  # the reference, captured too
    # `fbnas search` defaults on CUDA: soft ops, hard bits, bf16 autocast, NHWC, CUDA graphs
    "fbnas_default": ("soft", True, "bf16", True, "hard", True),
    "fbnas_default_fp32": ("soft", True, None, True, "hard", True),  # amp=false
    "fbnas_default_nchw": ("soft", True, "bf16", False, "hard", True),  # channels_last=false
    "fbnas_default_fp32_nchw": ("soft", True, None, False, "hard", True),
    "fbnas_default_eager": ("soft", True, "bf16", True, "hard", False),  # cuda_graph=false
    "fbnas_default_nchw_eager": ("soft", True, "bf16", False, "hard", False),  # both false
    "fbnas_default_fp32_nchw_eager": ("soft", True, None, False, "hard", False),
    "fbnas_soft_bits": ("soft", True, "bf16", True, "soft", True),  # soft ops, soft (EdMIPS-mixed) bits
    "fbnas_soft_bits_fp32": ("soft", True, None, True, "soft", True),
    "fbnas_soft_bits_nchw_eager": ("soft", True, "bf16", False, "soft", False),
    "fbnas_hard_bits": ("hard", True, "bf16", False, "hard", False),  # one path per step (mode=hard): eager
    "fbnas_hard_bits_channels_last": ("hard", True, "bf16", True, "hard", False),
    "fbnas_hard_bits_fp32": ("hard", True, None, False, "hard", False),
    "fbnas_two_path": ("two_path", True, "bf16", False, "hard", False),  # two mixed paths (mode=two_path): eager
    "fbnas_two_path_fp32": ("two_path", True, None, False, "hard", False),
    # a probe of the GPU time the default's kernels could reach, not a search option: fp16 kernels (cuDNN's
    # BatchNorm and depthwise convs in NHWC) without the loss scaling an fp16 search would need
    "probe_default_fp16": ("soft", True, "fp16", True, "hard", True),
}
DEFAULT_GPU_CONFIGS = ("reference_fp32_all_paths", "reference_fp32_all_paths_graph", "fbnas_default",
                       "fbnas_default_fp32", "fbnas_default_eager", "fbnas_soft_bits", "fbnas_hard_bits",
                       "fbnas_hard_bits_fp32", "fbnas_two_path", "fbnas_two_path_fp32")
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def build_step(name: str, args: dict, dev):
    """The supernet of configuration `name` with its optimizers and one fixed batch; returns (net, space, step,
    autocast, channels_last, graph), `step` running one search step, `autocast` the autocast dtype's name (None:
    fp32) and the last three as in effect on `dev` (graph: the step replays a CUDA graph)."""
    import torch
    import torch.nn.functional as F

    from fbnas import load_space
    from fbnas.latency import fixed_latency, get_table, latency_matrix
    from fbnas.objective import MultiplicativePenalty
    from fbnas.cuda_graph import GraphedGradients, can_capture
    from fbnas.supernet import Supernet, sample_cost

    mode, quantized, autocast, channels_last, bit_sampling, graph = CONFIGS[name]
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    space = load_space(args["space"])
    table = get_table(space, args["lut_device"])
    lat_m, lat_fixed = latency_matrix(table, space).to(dev), fixed_latency(table, space)
    net = Supernet(space, mode=mode, quantized=quantized, bit_sampling=bit_sampling).to(dev)
    channels_last = channels_last and dev.type == "cuda"
    amp = autocast is not None and dev.type == "cuda"
    amp_dtype = getattr(torch, AUTOCAST_DTYPES[autocast]) if amp else torch.bfloat16
    if channels_last:
        net = net.use_channels_last()
    fused = dev.type == "cuda"
    w_opt = torch.optim.SGD(net.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)  # unsampled ops have no grad: no fused SGD
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=0.01, weight_decay=5e-4, fused=fused)
    penalty = MultiplicativePenalty(ref_ms=float(lat_m.mean(dim=(1, 2, 3)).sum()) + lat_fixed)
    b, size = args["batch"], space.input_size
    x = torch.randn(b, space.in_channels, size, size, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, space.num_classes, (b,), device=dev)

    def loss_of_step():
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp, cache_enabled=False):
            logits = net(x)
        loss = penalty(F.cross_entropy(logits.float(), y), sample_cost(net, lat_m) + lat_fixed)
        return {"loss": loss.detach()}, loss

    def eager_step():
        w_opt.zero_grad(set_to_none=True)
        a_opt.zero_grad(set_to_none=True)
        loss_of_step()[1].backward()
        w_opt.step()
        a_opt.step()

    def staged_loss():
        with net.staging():
            return loss_of_step()

    graph = graph and can_capture(dev, net) is None
    graphed = (GraphedGradients(staged_loss, list(net.parameters()), release=net.release_sample)
               if graph else None)
    eager_steps = [0]

    def step():
        # as `fbnas search` does: the first step eager (activation ranges), then the captured graph
        if graphed is None or net._fixed is not None or eager_steps[0] == 0:
            eager_step()
            eager_steps[0] += 1
            return
        net.stage_sample()
        graphed()
        w_opt.step()
        a_opt.step()
        w_opt.zero_grad(set_to_none=True)
        a_opt.zero_grad(set_to_none=True)

    return net, space, step, autocast if amp else None, channels_last, graph


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


def gpu_time(step, steps: int = 3) -> dict[str, float]:
    """The GPU's own milliseconds per step (the sum of its kernels' durations over `steps` profiled steps), in
    all and by kind of kernel."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kinds = {"batchnorm": 0.0, "depthwise_conv": 0.0, "other": 0.0}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name.lower()
        kind = ("batchnorm" if "batch_norm" in name or "bn_" in name else
                "depthwise_conv" if "depthwise" in name else "other")
        kinds[kind] += e.device_time / 1000 / steps
    return {"total": sum(kinds.values()), **kinds}


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
    if dev.type == "cuda":  # reserved: what the process holds, a CUDA graph's memory pool included
        return dt, torch.cuda.max_memory_reserved() / 2 ** 30, "cuda max_memory_reserved"
    return dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "process max RSS"


def measure(name: str, args: dict, queue) -> None:
    import torch

    mode, quantized, _, _, bit_sampling, _ = CONFIGS[name]
    dev = torch.device(args["device"])
    net, space, step, autocast, channels_last, graph = build_step(name, args, dev)
    warm_up(net, space, step, args["warmup"], dev)
    host_syncs, sync_sites = None, []
    if dev.type == "cuda":
        host_syncs, sync_sites = count_host_syncs(step, dev)
    if args["profile"]:
        print_profile(name, step, dev)
    dt, peak, mem_kind = timed_steps(step, args["steps"], dev)
    gpu_ms = gpu_time(step) if dev.type == "cuda" else None
    b = args["batch"]
    queue.put({"config": name, "mode": mode, "bit_sampling": bit_sampling, "quantized": quantized,
               "cuda_graph": graph,
               "autocast": autocast, "channels_last": channels_last,
               "images_per_s": args["steps"] * b / dt, "step_ms": 1000 * dt / args["steps"],
               "gpu_ms_per_step": gpu_ms, "peak_mem_gib": peak, "memory": mem_kind,
               "host_syncs_per_step": host_syncs, "sync_sites": sync_sites})


def markdown_table(results: list[dict], ref: dict | None) -> str:
    """The results as a Markdown table; adds each result's ratios to the reference `ref` (None: no ratios)."""
    lines = ["| config | kernels | images/s | step ms | GPU ms | BN | depthwise | other | peak GiB | x reference "
             "| memory x | host syncs/step |", "|---|---|" + "---:|" * 10]
    for r in results:
        if ref:
            r["speedup_vs_reference"] = r["images_per_s"] / ref["images_per_s"]
            r["memory_vs_reference"] = r["peak_mem_gib"] / ref["peak_mem_gib"]
        g = r.get("gpu_ms_per_step") or {}
        gpu = [f"{g[k]:.1f}" if k in g else "-" for k in ("total", "batchnorm", "depthwise_conv", "other")]
        lines.append(f"| {r['config']} | {r.get('autocast') or 'fp32'}{' NHWC' if r['channels_last'] else ''}"
                     f"{' graph' if r.get('cuda_graph') else ''} | "
                     f"{r['images_per_s']:.1f} | {r['step_ms']:.1f} | {' | '.join(gpu)} | {r['peak_mem_gib']:.2f} | "
                     f"{r.get('speedup_vs_reference', float('nan')):.2f} | "
                     f"{r.get('memory_vs_reference', float('nan')):.3f} | {r['host_syncs_per_step']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--space", default="fbnet_cifar100")
    ap.add_argument("--lut-device", default="sd835")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--configs", default=None, help="comma-separated names of CONFIGS (default: "
                    + ",".join(DEFAULT_GPU_CONFIGS) + ")")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table per configuration")
    args = vars(ap.parse_args())
    args["configs"] = args["configs"] or ",".join(DEFAULT_GPU_CONFIGS)
    unknown = [c for c in args["configs"].split(",") if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    ctx = mp.get_context("spawn")
    results: list[dict] = []
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
        g = r["gpu_ms_per_step"]
        gpu = (f", GPU {g['total']:.1f} ms/step (BN {g['batchnorm']:.1f}, depthwise {g['depthwise_conv']:.1f}, "
               f"other {g['other']:.1f})" if g else "")
        print(f"{name}: {r['images_per_s']:.1f} images/s, {r['step_ms']:.1f} ms/step{gpu}, {r['peak_mem_gib']:.2f} "
              f"GiB, host syncs per step {r['host_syncs_per_step']} {r['sync_sites']}", flush=True)
        write_results(args, results)  # after every configuration: a run cut short keeps what it measured
    ref = next((r for r in results if r["config"] == "reference_fp32_all_paths"), None)
    print(f"space {args['space']}, batch {args['batch']}, device {args['device']}, {args['steps']} timed steps\n")
    print(markdown_table(results, ref))
    write_results(args, results)


def write_results(args: dict, results: list[dict]) -> None:
    if not args["out"]:
        return
    import torch

    from fbnas.io import atomic_write_json

    env = {"torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if args["device"].startswith("cuda") else "cpu"}
    atomic_write_json(args["out"], {"settings": args, "environment": env, "results": results})


if __name__ == "__main__":
    main()

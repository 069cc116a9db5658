"""The fbnet_cifar100 search step (weight step + architecture step, `Searcher.weight_step` / `arch_step`) on
several ranks, at a fixed per-rank batch: images/s, peak memory per rank, host syncs per step; and the cost of
the distributed machinery itself (`--overhead`: the same steps with and without the gradient all-reduce, in one
run, alternating blocks); `--vs-ddp`: the weight step with fbnas's one flat all-reduce after backward against
torch's DistributedDataParallel(find_unused_parameters=True) over the same supernet and batches (a single-path
step leaves the unsampled ops without gradients, which DDP finds by walking the autograd graph every step).

    torchrun --nproc_per_node 1 bench/ddp_scaling.py --overhead --out o.json       # world size 1 vs plain, one GPU
    torchrun --nproc_per_node 8 bench/ddp_scaling.py --modes hard,default --out s8.json
    python bench/ddp_scaling.py --summarize s1.json s2.json s4.json s8.json        # scaling efficiency table
    torchrun --nproc_per_node 2 bench/ddp_scaling.py --device cpu --batch 8 --steps 2 --warmup 1   # CPU smoke
    torchrun --nproc_per_node 2 bench/ddp_scaling.py --vs-ddp --modes hard --device cpu --batch 32 --out d.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = {"hard": ("hard", "hard"), "default": ("soft", "hard")}  # name: (mode, bit_sampling)


def make_searcher(mode: str, batch: int, device: str, steps: int, out: Path):
    from fbnas.config import DataConfig, DeriveConfig, SearchConfig
    from fbnas.search import Searcher

    op_mode, bits = MODES[mode]
    import os

    # synthetic images: the 20% architecture split holds 10 global batches, the weight split 40
    n = batch * int(os.environ.get("WORLD_SIZE", "1")) * 50
    cfg = SearchConfig(space="fbnet_cifar100", device="sd835", mode=op_mode, bit_sampling=bits, epochs=1,
                       warmup_epochs=0, accelerator=device, progress=False,
                       data=DataConfig(name="synthetic", synthetic_size=n, input_size=32, batch_size=batch,
                                       eval_batch_size=batch),
                       derive=DeriveConfig(eval_batches=1, calibration_batches=1))
    return Searcher(cfg, out)


def batches(s, count: int):
    """`count` (weight, arch) batch pairs of this rank, prepared before timing."""
    w, a = iter(s.w_loader), iter(s.a_loader)
    out = []
    for _ in range(count):
        try:
            xw = next(w)
        except StopIteration:
            w = iter(s.w_loader)
            xw = next(w)
        try:
            xa = next(a)
        except StopIteration:
            a = iter(s.a_loader)
            xa = next(a)
        out.append((xw, xa))
    return out


def step(s, pair) -> None:
    (x, y), (xa, ya) = pair
    s.weight_step(x, y, warmup=False)
    s.arch_step(xa, ya)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_syncs(s, pair) -> int:
    """Device-to-host synchronisations in one step (CUDA's sync debug mode warns on each); None on a CPU."""
    import torch

    if s.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(s, pair)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def weight_step_only(s, pair) -> None:
    (x, y), _ = pair
    s.weight_step(x, y, warmup=False)


def timed(s, data, steps: int, one_step=step) -> float:
    sync(s.device)
    t0 = time.perf_counter()
    for i in range(steps):
        one_step(s, data[i % len(data)])
    sync(s.device)
    return (time.perf_counter() - t0) / steps


def vs_ddp(s, data, a) -> dict:
    """Median seconds of a weight step with fbnas's flat all-reduce (Dist.sync after backward) and with
    DistributedDataParallel(find_unused_parameters=True) doing the reduction, in alternating blocks. DDP's hooks
    fire on every backward through the parameters, so each DDP block wraps the supernet anew (one untimed step
    builds its buckets) and drops the wrapper after."""
    import gc

    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from fbnas import distributed
    from fbnas.supernet import sample_cost

    net, dist, own_forward = s.supernet, s.dist, s._forward

    def ddp_block() -> float:
        ddp = DistributedDataParallel(net, device_ids=[s.device.index] if s.device.type == "cuda" else None,
                                      find_unused_parameters=True)

        def ddp_forward(x, y):  # Searcher._forward with the wrapper around the supernet
            with s._autocast():
                logits = ddp(s._prep(x))
            return logits, F.cross_entropy(logits.float(), y), sample_cost(net, s.lat_matrix) + s.latency.fixed_ms

        s.dist, s._forward = distributed.Dist(), ddp_forward
        timed(s, data, 1, weight_step_only)
        seconds = timed(s, data, a.steps, weight_step_only)
        s.dist, s._forward = dist, own_forward
        return seconds

    own, wrapped = [], []
    for _ in range(a.blocks):
        own.append(timed(s, data, a.steps, weight_step_only))
        wrapped.append(ddp_block())
        gc.collect()  # the wrapper's reducer, and with it its hooks, goes
    return {"weight_step_s_flat_all_reduce": statistics.median(own),
            "weight_step_s_ddp_find_unused": statistics.median(wrapped),
            "ddp_over_flat": statistics.median(wrapped) / statistics.median(own)}


def run_mode(mode: str, a, out_dir: Path) -> dict:
    import torch

    from fbnas import distributed

    s = make_searcher(mode, a.batch, a.device, a.steps, out_dir)
    d = s.dist
    data = batches(s, min(a.steps, 8))
    for i in range(a.warmup):
        step(s, data[i % len(data)])
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    rec = {"mode": mode, "world_size": d.world, "batch_per_rank": a.batch}
    if a.vs_ddp:
        return {**rec, **vs_ddp(s, data, a)}
    if a.overhead:  # the same steps with the all-reduce (s.dist) and without (a plain Dist): blocks alternate
        plain = distributed.Dist()
        t_dist, t_plain = [], []
        for _ in range(a.blocks):
            s.dist = d
            t_dist.append(timed(s, data, a.steps))
            s.dist = plain
            t_plain.append(timed(s, data, a.steps))
        s.dist = d
        rec.update(step_s_distributed=statistics.median(t_dist), step_s_plain=statistics.median(t_plain),
                   overhead=statistics.median(t_dist) / statistics.median(t_plain) - 1.0)
        per_step = statistics.median(t_dist)
    else:
        per_step = timed(s, data, a.steps)
    rec["step_s"] = per_step
    rec["img_s_per_rank"] = a.batch / per_step  # weight-step images (the arch step's are extra)
    rec["img_s_global"] = d.sum(rec["img_s_per_rank"])[0] if d.active else rec["img_s_per_rank"]
    rec["peak_mem_gb_per_rank"] = (torch.cuda.max_memory_allocated(s.device) / 1e9 if s.device.type == "cuda"
                                   else None)
    rec["host_syncs_per_step"] = host_syncs(s, data[0])
    return rec


def summarize(paths: list[str]) -> str:
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["results"]]
    base = {r["mode"]: r["img_s_global"] for r in rows if r["world_size"] == 1}
    lines = ["| mode | GPUs | batch/GPU | img/s (all) | scaling efficiency | peak GB/GPU | host syncs/step |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["mode"], r["world_size"])):
        eff = r["img_s_global"] / (r["world_size"] * base[r["mode"]]) if r["mode"] in base else float("nan")
        mem = f"{r['peak_mem_gb_per_rank']:.2f}" if r["peak_mem_gb_per_rank"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['world_size']} | {r['batch_per_rank']} | {r['img_s_global']:.0f} | "
                     f"{eff:.3f} | {mem} | {r['host_syncs_per_step']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="hard,default")
    p.add_argument("--batch", type=int, default=256, help="per rank")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--blocks", type=int, default=5, help="--overhead: alternating blocks of --steps each")
    p.add_argument("--overhead", action="store_true")
    p.add_argument("--vs-ddp", action="store_true", help="flat all-reduce vs DDP(find_unused_parameters=True)")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default="/tmp/fbnas_ddp_scaling")
    p.add_argument("--out")
    p.add_argument("--summarize", nargs="+")
    a = p.parse_args()
    if a.summarize:
        print(summarize(a.summarize))
        return
    import torch

    from fbnas import distributed

    d = distributed.init_from_env()
    results = []
    for mode in a.modes.split(","):
        results.append(run_mode(mode, a, Path(a.work) / f"{mode}_rank{d.rank}"))
        if d.is_main:
            print(json.dumps(results[-1]), flush=True)
    if d.is_main and a.out:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and a.device != "cpu" else "cpu"
        Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), "hardware": gpu, "torch": torch.__version__,
                                           "results": results}, indent=1))
    distributed.shutdown()


if __name__ == "__main__":
    main()

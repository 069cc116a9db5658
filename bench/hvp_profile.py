"""Where the time of one Hessian-vector product goes: forward+backward vs a double-backward HVP (graph
reused) vs forward-over-reverse (torch.func, K probes vmapped), on the fbnet_cifar100 child of bench/hessian.py,
with a torch.profiler table of the double-backward HVP.

    python bench/hvp_profile.py --device cuda [--batch-size 64]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hessian import make_child, sync  # noqa: E402

from fbnas.hessian import child_groups, float_eval_mode  # noqa: E402


def timed(fn, device, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--space", default="fbnet_cifar100")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--probes", type=int, default=8, help="K for the vmapped engines")
    ap.add_argument("--benchmark-cudnn", action="store_true")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = a.benchmark_cudnn
    _, model, data, order = make_child(a.space, device, 20, a.batch_size, 0)
    x, y = data.x[order[:a.batch_size]].to(device), data.y[order[:a.batch_size]].to(device)
    params = [p for ps in child_groups(model).values() for p in ps]
    gen = torch.Generator(device=device).manual_seed(0)
    v = [torch.randint(0, 2, p.shape, generator=gen, device=device).float() * 2 - 1 for p in params]
    with float_eval_mode(model):
        fb = timed(lambda: torch.autograd.grad(F.cross_entropy(model(x), y), params), device)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        hvp = lambda: torch.autograd.grad(grads, params, v, retain_graph=True)  # noqa: E731
        t_hvp = timed(hvp, device)
        vb = [t.unsqueeze(0).expand(a.probes, *t.shape).contiguous() for t in v]
        batched = lambda: torch.autograd.grad(grads, params, vb, retain_graph=True, is_grads_batched=True)  # noqa: E731
        try:
            t_batched = timed(batched, device) / a.probes
        except RuntimeError as exc:
            t_batched = float("nan")
            print(f"batched engine failed: {str(exc).splitlines()[0]}")
        print(f"forward+backward {fb:.2f} ms; double-backward HVP (graph reused) {t_hvp:.2f} ms "
              f"({t_hvp / fb:.2f}x); batched x{a.probes}: {t_batched:.2f} ms per probe ({t_batched / fb:.2f}x)",
              flush=True)
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            hvp()
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15))


if __name__ == "__main__":
    main()

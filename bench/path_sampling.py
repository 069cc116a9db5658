"""How fast a supernet's shared weights train when each step runs only some ops per layer (weights only, no
architecture steps): the cross-entropy of the training batches, averaged over windows of steps, per scheme.

    python bench/path_sampling.py [--space fmnist] [--steps 200] [--out bench/results/path_sampling/<host>.md]

Schemes (per layer and step; the computed ops' outputs are averaged):
  paths<k>          k ops drawn uniformly without replacement (paths1: single path, `mode=hard`'s weight steps;
                    paths2: `mode=two_path`'s; paths8 on fmnist: every op, as `mode=soft`)
  anchored          one op per layer fixed for the whole run (drawn once) plus one other drawn every step
  anchored<R>       the same with the anchors re-drawn every R steps (each op anchors equally often over a run)
  paths<k>_residual k ops drawn in the layers with a residual only; every other layer runs one fixed op

Float weights (no fake quantization) and one seed: it measures the weight sharing, not the quantizers.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def layer_choices(scheme: str, layers, n_ops: int, step: int, rng: random.Random, state: dict) -> list[list[int]]:
    m = re.fullmatch(r"paths(\d+)(_residual)?", scheme)
    if m:
        k, residual_only = int(m.group(1)), bool(m.group(2))
        fixed = state.setdefault("fixed", [rng.randrange(n_ops) for _ in layers])
        return [rng.sample(range(n_ops), k) if not residual_only or getattr(layer.ops[0], "has_residual", False)
                else [fixed[i]] for i, layer in enumerate(layers)]
    m = re.fullmatch(r"anchored(\d*)", scheme)
    if not m:
        raise SystemExit(f"unknown scheme {scheme!r}: paths<k>, paths<k>_residual, anchored, anchored<R>")
    every = int(m.group(1) or 0)
    if "anchors" not in state or (every and step % every == 0):
        state["anchors"] = [rng.randrange(n_ops) for _ in layers]
    return [[a, rng.choice([i for i in range(n_ops) if i != a])] for a in state["anchors"]]


def train(space, data, scheme: str, steps: int, batch: int, lr: float, momentum: float, window: int,
          seed: int) -> list[float]:
    import torch
    import torch.nn.functional as F

    from fbnas.supernet import Supernet

    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = Supernet(space, mode="hard", quantized=False)
    net.train()
    opt = torch.optim.SGD(net.weight_parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    n_ops, state, losses, means = len(space.candidates), {}, [], []
    for step in range(steps):
        idx = torch.randint(0, len(data.y), (batch,), generator=gen)
        x = net.stem(data.x[idx])
        for layer, ops in zip(net.mixed_layers, layer_choices(scheme, net.mixed_layers, n_ops, step, rng, state)):
            coef = torch.zeros(n_ops)
            coef[ops] = 1.0 / len(ops)
            layer.last_indices, layer.last_coef = ops, coef
            x = layer(x, True)
        loss = F.cross_entropy(net.head(x), data.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % window == 0:
            means.append(sum(losses[-window:]) / window)
    return means


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="fmnist")
    ap.add_argument("--on-fashion-mnist", action="store_true",
                    help="train any space on Fashion-MNIST (its input and classes changed to 1x28x28, 10)")
    ap.add_argument("--schemes", default="paths1,paths2,paths4,paths8,anchored,anchored100,anchored25,paths8_residual")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--window", type=int, default=50, help="steps per reported mean")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    ap.add_argument("--out", default=None, help="write the table (markdown) here")
    a = ap.parse_args()

    import torch

    from fbnas.data import load_dataset
    from fbnas.io import atomic_write_text
    from fbnas.latency.measured import _cpu_name
    from fbnas.space import load_space, override_io

    if a.threads:
        torch.set_num_threads(a.threads)
    space = load_space(a.space)
    if a.on_fashion_mnist:
        space = override_io(space, in_channels=1, input_size=28, num_classes=10)
    data = load_dataset("fashion_mnist" if a.on_fashion_mnist else space.dataset, input_size=space.input_size,
                        in_channels=space.in_channels).train
    cols = [f"step {(i + 1) * a.window}" for i in range(a.steps // a.window)]
    lines = [f"command: python bench/path_sampling.py {' '.join(sys.argv[1:])}",
             f"hardware: {_cpu_name()} ({os.cpu_count()} logical cores, {platform.machine()}); CPU only, "
             f"torch {torch.__version__}",
             f"space {space.name}, float weights, batch {a.batch}, SGD lr {a.lr} momentum {a.momentum}, seed {a.seed}; "
             f"training cross-entropy, mean over each {a.window} steps", "",
             "| scheme | " + " | ".join(cols) + " | seconds |", "|---|" + "---:|" * (len(cols) + 1)]
    for scheme in a.schemes.split(","):
        t0 = time.time()
        means = train(space, data, scheme, a.steps, a.batch, a.lr, a.momentum, a.window, a.seed)
        lines.append(f"| {scheme} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {time.time() - t0:.0f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if a.out:
        atomic_write_text(a.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

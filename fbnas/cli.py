"""`fbnas <command> [sub-command] [hydra overrides...]`: dispatches to one Hydra app per command."""
from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "search": "fbnas.apps.search",
    "lut": "fbnas.apps.lut",
    "hessian": "fbnas.apps.hessian",
    "train": "fbnas.apps.train",
    "quantize": "fbnas.apps.quantize",
    "export": "fbnas.apps.export",
    "pareto": "fbnas.apps.pareto",
    "list": "fbnas.apps.listing",
    "info": "fbnas.apps.info",
    "report": "fbnas.apps.report",
}

DISTRIBUTED = ("search", "train")  # commands that run as several ranks under torchrun (docs/distributed.md)

USAGE = """usage: fbnas <command> [args] [key=value ...]

commands:
  search     differentiable architecture + bit-width search (Hydra; -m for sweeps)
  lut        latency tables: build | check | show | predict | export-ops | import
  hessian    per-layer Hessian traces of a checkpoint or an arch + weights
  train      quantization-aware training of a found architecture
  quantize   integer-only model: convert | compare | ilp | onnx
  export     export a found architecture (safetensors, torch.export, ONNX)
  pareto     train searched nets and baselines with one recipe: accuracy vs device latency
  list       spaces | devices | ops: what a space=, device= or op name may be
  info       <arch.json>: layers, bits, MACs, parameters, latency on every device
  report     run=<search run> | sweep=<multirun dir>: report.md and plots (op/bit probabilities, latency, CE)

Commands other than list and info take Hydra overrides (key=value); `fbnas <command> --help` shows its
config.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"fbnas: error: unknown command {cmd!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[cmd])
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("fbnas.apps"):
            print(f"fbnas: error: command {cmd!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    if cmd in DISTRIBUTED and "RANK" in os.environ:  # one rank of many (torchrun): join them before Hydra starts
        # c10d's C++ retry warnings (with stack traces) would bury the one-line error of an unreachable master
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
        from .distributed import launch_overrides
        from .errors import FbnasError

        try:
            rest = launch_overrides(rest)
        except FbnasError as exc:
            print(f"fbnas: error: {exc}", file=sys.stderr)
            return 2
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())

"""The Pareto study on Fashion-MNIST: for each device, `fbnas search objective.kind=target` at budgets that are
fractions of the MobileNetV2-like W8A8 net's latency on that device, then `fbnas pareto` over the found nets
with random nets at each budget, the hand-designed nets and the found nets at uniform bits, every network
trained with one recipe and several seeds by N workers sharing one GPU (or the CPU).

    python bench/pareto_study.py                      # one CUDA GPU: sd835 and bitfusion, 0.4/0.6/0.8x
    python bench/pareto_study.py --estimate-only      # print the plan and its estimated time
    python bench/pareto_study.py --tiny --accelerator cpu --devices sd835 --fractions 0.6   # smoke test

Machines without hydra-core/omegaconf (pure-Python wheels): unzip the wheels and point FBNAS_EXTRA_PYTHONPATH
at them; it goes in front of PYTHONPATH of every fbnas process. Nothing is installed:

    for w in wheels/*.whl; do python -m zipfile -e "$w" /tmp/site; done
    FBNAS_EXTRA_PYTHONPATH=/tmp/site python bench/pareto_study.py --out "$OUT/pareto"

Phases: (A) the searches run side by side while the baselines (random + hand-designed) train; (B) the found
nets and their uniform-bit versions train and the reports are written. Everything is resumable: rerunning
the same command reuses finished searches and trainings. Results (pareto.json/.md/.png, command.txt, per-job
results, the archs, the search runs' arch.json and metrics) are copied to --out/<device>/.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (os.environ.get("FBNAS_EXTRA_PYTHONPATH", ""), str(REPO)) if p]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="sd835,bitfusion")
    p.add_argument("--fractions", default="0.4,0.6,0.8", help="budgets as fractions of the MobileNetV2-like W8A8")
    p.add_argument("--accelerator", default="cuda")
    p.add_argument("--work", default=str(REPO / "runs" / "pareto_study"),
                   help="run directories (searches, trainings); a rerun with the same --work resumes")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "pareto"), help="results copied here")
    p.add_argument("--workers", type=int, default=10,
                   help="training processes sharing the accelerator while the searches run")
    p.add_argument("--workers-after", type=int, default=14, help="training processes after the searches (all devices)")
    p.add_argument("--random", type=int, default=12, help="random nets per budget")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--search-epochs", type=int, default=6)
    p.add_argument("--modes", default="soft,hard,two_path",
                   help="search modes at every budget: soft (all paths, the default), hard (single path), two_path; "
                        "a suffix _a<K> sets anchor_steps=K (two_path), _s<N> the search seed N (default 0)")
    p.add_argument("--hard-epochs", type=int, default=8,
                   help="epochs of a single-path search (its steps are ~5x cheaper than an all-paths step)")
    p.add_argument("--search-steps", type=int, default=0, help="max weight steps per search epoch (0: all)")
    p.add_argument("--search-subset", type=int, default=16000, help="training images of a search (its default)")
    p.add_argument("--epochs", type=int, default=3, help="QAT epochs (BN) of every training")
    p.add_argument("--fold-epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=80, help="steps per training epoch")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--data-root", default=None, help="directory with the Fashion-MNIST idx files (default: "
                   "fbnas's search path, e.g. /usr/share/datasets/fashion-mnist)")
    p.add_argument("--train-subset", type=int, default=0, help="training images of every training (0: all 60000)")
    p.add_argument("--test-subset", type=int, default=0)
    p.add_argument("--search-step-s", type=float, default=0.27,
                   help="estimate: seconds per search step with the searches side by side (6 on an H100: 25-29 s "
                        "per 100-step epoch, bench/results/search_gpu_runs.md)")
    p.add_argument("--train-steps-per-s", type=float, default=250.0,
                   help="estimate: training steps per second of all workers together (an assumption; the run "
                        "prints the measured value)")
    p.add_argument("--time-budget-s", type=float, default=540, help="warn when the estimate exceeds it")
    p.add_argument("--searches-first", action="store_true",
                   help="run the searches alone first, then every training with the found nets first (when a time "
                        "limit may cut the run short, the found nets are trained before the baselines)")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes (minutes on a CPU)")
    p.add_argument("--estimate-only", action="store_true")
    a = p.parse_args()
    if a.tiny:
        a.search_epochs, a.search_steps, a.search_subset = 2, 2, 1024
        a.epochs, a.fold_epochs, a.steps, a.batch = 1, 1, 2, 64
        a.train_subset, a.test_subset, a.random, a.seeds = 1024, 500, 2, "0"
        a.workers, a.workers_after = min(a.workers, 2), min(a.workers_after, 2)
    return a


def child_env() -> dict:
    extra = os.environ.get("FBNAS_EXTRA_PYTHONPATH", "")
    path = [p for p in (extra, str(REPO), os.environ.get("PYTHONPATH", "")) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1", WANDB_MODE="disabled",
                PYTHONUNBUFFERED="1")


def fbnas_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fbnas.cli", *args]


def mbv2_ms(device: str) -> float:
    from fbnas.latency import get_table
    from fbnas.pareto import mbv2_reference_ms
    from fbnas.space import load_space

    space = load_space("fmnist")
    return mbv2_reference_ms(space, get_table(space, device))


def search_args(a, device: str, limit_ms: float, mode: str, run_dir: Path) -> list[str]:
    spec = re.fullmatch(r"(soft|hard|two_path)(?:_a(\d+))?(?:_s(\d+))?", mode)
    if spec is None:
        raise SystemExit(f"--modes: {mode!r} is not <soft|hard|two_path>[_a<anchor steps>][_s<search seed>]")
    mode, anchor_steps, seed = spec.groups()
    epochs = a.hard_epochs if mode == "hard" else a.search_epochs
    args = ["search", f"device={device}", "objective.kind=target", f"objective.limit_ms={limit_ms!r}",
            f"mode={mode}", f"accelerator={a.accelerator}", "threads=1", "progress=false", f"epochs={epochs}",
            f"data.train_subset={a.search_subset}", f"hydra.run.dir={run_dir}"]
    if anchor_steps:
        args.append(f"anchor_steps={int(anchor_steps)}")
    if seed:
        args.append(f"seed={int(seed)}")
    if a.search_steps:
        args.append(f"max_steps_per_epoch={a.search_steps}")
    if a.data_root:
        args.append(f"data.root={a.data_root}")
    if a.tiny:
        args += ["warmup_epochs=1", "derive.eval_batches=1", "data.batch_size=64"]
    if (run_dir / "checkpoints" / "last.pt").is_file():
        args.append("resume=true")
    return args


def pareto_args(a, device: str, runs: list[Path], baselines: str, workers: int, out: Path) -> list[str]:
    args = ["pareto", f"device={device}", f"runs=[{','.join(map(str, runs))}]", f"baselines=[{baselines}]",
            f"budgets=[{a.fractions}]", "budget_unit=mbv2", f"seeds=[{a.seeds}]", f"workers={workers}",
            f"train.accelerator={a.accelerator}", f"train.epochs={a.epochs}", f"train.fold_epochs={a.fold_epochs}",
            f"train.max_steps_per_epoch={a.steps}", f"train.batch_size={a.batch}", f"train.lr={a.lr}",
            f"data.train_subset={a.train_subset}", f"data.test_subset={a.test_subset}", "progress=false",
            f"hydra.run.dir={out}"]
    if a.data_root:
        args.append(f"data.root={a.data_root}")
    if a.tiny:
        args.append("train.calib_batches=2")
    return args


def estimate(a, devices: list[str], fractions: list[float]) -> dict:
    modes = a.modes.split(",")
    n_search = len(devices) * len(fractions) * len(modes)
    steps_per_epoch = a.search_steps or a.search_subset * 4 // 5 // 128
    search_s = a.search_epochs * steps_per_epoch * a.search_step_s + 30  # + start-up and derivation
    seeds = len(a.seeds.split(","))
    per_device_base = (a.random * len(fractions) + 6) * seeds  # random + 3 hand-designed x 2 bit-widths
    per_device_found = len(fractions) * len(modes) * 3 * seeds  # found nets + W8A8 + W4A8 versions
    # evaluations: test set after every epoch and ~6 more at the end (BN, float, fake-quant, integer, predictions),
    # in batches of 500, counted as half a training step each
    eval_batches = (a.epochs + a.fold_epochs + 6) * -(-(a.test_subset or 10000) // 500)
    steps_job = (a.epochs + a.fold_epochs) * a.steps + eval_batches // 2
    base_s = len(devices) * per_device_base * steps_job / a.train_steps_per_s
    found_s = len(devices) * per_device_found * steps_job / a.train_steps_per_s
    start_s = 20  # python + CUDA start-up of the workers, per pareto call
    total = max(search_s, base_s + start_s * len(devices)) + found_s + start_s * len(devices)
    trainings = len(devices) * (per_device_base + per_device_found)
    return {"searches": n_search, "search_s": search_s, "trainings": trainings, "steps_per_training": steps_job,
            "baselines_s": base_s, "found_s": found_s, "total_s": total}


def run_logged(cmd: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log, "a")
    fh.write(f"$ {' '.join(cmd)}\n")
    fh.flush()
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)


def watch(procs: dict[str, subprocess.Popen], ended: dict[str, tuple[int, float]], t0: float,
          until: set[str]) -> None:
    """Poll every process, noting (exit code, seconds since t0) as each ends, until those in `until` have."""
    while not until <= set(ended):
        for name, p in procs.items():
            if name not in ended and p.poll() is not None:
                ended[name] = (p.returncode, time.time() - t0)
                print(f"[{ended[name][1]:5.0f}s] {name} done (rc {p.returncode})", flush=True)
        time.sleep(1)


def gpu_name(accelerator: str) -> str:
    if not accelerator.startswith("cuda"):
        return "none (CPU)"
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                       text=True)
    return r.stdout.strip() or "unknown GPU"


def copy_results(work: Path, out: Path, device: str, runs: list[Path], lines: list[str]) -> None:
    src, dst = work / device / "pareto", out / device
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("pareto.json", "pareto.md", "pareto.png", "command.txt"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    for sub in ("results", "archs"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
    for run in runs:
        for name in ("arch.json", "metrics.jsonl"):
            if (run / name).is_file():
                (dst / "search" / run.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(run / name, dst / "search" / run.name / name)
    (dst / "study.txt").write_text("\n".join(lines) + "\n")


def main() -> int:
    a = parse_args()
    devices, fractions = a.devices.split(","), [float(f) for f in a.fractions.split(",")]
    work, out = Path(a.work), Path(a.out)
    est = estimate(a, devices, fractions)
    cmd_line = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"plan: {est['searches']} searches side by side (~{est['search_s']:.0f} s), {est['trainings']} trainings of "
          f"~{est['steps_per_training']} step-equivalents ({a.workers} workers): baselines ~{est['baselines_s']:.0f} s during "
          f"the searches, found nets ~{est['found_s']:.0f} s after; estimated total {est['total_s']:.0f} s "
          f"({est['total_s'] / 60:.1f} min) at {a.search_step_s} s/search step and {a.train_steps_per_s:.0f} "
          "training steps/s over all workers", flush=True)
    if est["total_s"] > a.time_budget_s:
        fit = next((s for s in range(a.steps, 0, -5)
                    if estimate(argparse.Namespace(**{**vars(a), "steps": s}), devices, fractions)["total_s"]
                    <= a.time_budget_s), None)
        print(f"warning: the estimate exceeds --time-budget-s {a.time_budget_s:.0f}; "
              + (f"--steps {fit} would fit it at the assumed rates" if fit else "fewer searches or devices needed"),
              flush=True)
    if a.estimate_only:
        return 0
    t0 = time.time()
    budgets = {d: [(f, f * mbv2_ms(d)) for f in fractions] for d in devices}
    searches: dict[str, subprocess.Popen] = {}
    runs: dict[str, list[Path]] = {d: [] for d in devices}
    for d in devices:
        for (f, ms), mode in itertools.product(budgets[d], a.modes.split(",")):
            name = f"{f:.2f}x" if mode == "soft" else f"{f:.2f}x_{mode}"
            run_dir = work / d / "search" / name
            runs[d].append(run_dir)
            if not (run_dir / "arch.json").is_file():
                searches[f"{d}@{name}"] = run_logged(fbnas_cmd(*search_args(a, d, ms, mode, run_dir)),
                                                     run_dir.parent / f"{name}.log")
    print(f"[{time.time() - t0:5.0f}s] {len(searches)} searches started: "
          + ", ".join(f"{d} limit {ms:.4g} ms ({f}x)" for d in devices for f, ms in budgets[d]), flush=True)
    ended: dict[str, tuple[int, float]] = {}
    procs: dict[str, subprocess.Popen] = dict(searches)
    for d in devices if not a.searches_first else ():  # phase A: the baselines train while the searches run
        procs[f"{d} baselines"] = run_logged(fbnas_cmd(*pareto_args(a, d, [], f"random:{a.random},handcrafted",
                                                                     a.workers, work / d / "pareto")),
                                             work / d / "pareto_baselines.log")
        watch(procs, ended, t0, {f"{d} baselines"})
    watch(procs, ended, t0, set(procs))
    if any(rc for rc, _ in ended.values()):
        print("a search or a baseline training failed; see the logs under", work, file=sys.stderr)
        return 1
    for d in devices:  # phase B: the found nets and their uniform-bit versions; the reports
        procs[d] = run_logged(fbnas_cmd(*pareto_args(a, d, runs[d], f"random:{a.random},handcrafted,uniform_bits",
                                                     max(1, a.workers_after // len(devices)), work / d / "pareto")),
                              work / d / "pareto.log")
    watch(procs, ended, t0, set(devices))
    total = time.time() - t0
    times = ", ".join(f"{name} {sec:.0f} s" for name, (_, sec) in ended.items())
    for d in devices:
        results = [json.loads(p.read_text()) for p in (work / d / "pareto" / "results").glob("*.json")]
        per_job = sum(r["seconds"] for r in results) / max(len(results), 1)
        lines = [f"command: {cmd_line}", f"gpu: {gpu_name(a.accelerator)}", f"cpu cores: {os.cpu_count()}",
                 "budgets: " + ", ".join(f"{f}x = {ms:.6g} ms" for f, ms in budgets[d]),
                 f"wall: total {total:.0f} s (all devices; estimate {est['total_s']:.0f} s); ended at: {times}",
                 f"trainings of {d}: {len(results)}, {per_job:.1f} s each on average with up to {a.workers} "
                 f"workers sharing the accelerator"]
        copy_results(work, out, d, runs[d], lines)
        print("\n".join(lines[-2:]))
        md = out / d / "pareto.md"
        if md.is_file():
            print(md.read_text())
    return 1 if any(rc for rc, _ in ended.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Crash-resume exactness: `fbnas search` and `fbnas train` are killed with SIGKILL at random moments, relaunched
with resume=true (or afresh when no checkpoint exists yet), and the finished run is compared with an
uninterrupted run of the same settings.

    PYTHONPATH=$PWD python bench/kill_resume.py [--total 20] [--kills 5] [--seed 0] [--work /tmp/kill_resume]
        [--out bench/results/kill_resume.json]

Each command is killed --total times in all, at most --kills times per run directory: once the relaunched
process has taken its run directory (imports and config done), after a delay uniform in [0, the uninterrupted
run's time from that point]; a relaunch that finishes before its kill ends that directory's run. Compared: arch.json's layers and
predictions and metrics.jsonl without wall-clock fields (search); metrics.json, metrics.jsonl without seconds,
and every tensor and the metadata of model.safetensors / integer.safetensors (train). Tiny synthetic settings keep it minutes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fbnas.io import atomic_write_json  # noqa: E402
from fbnas.rundir import LOCK_NAME  # noqa: E402

SEARCH = ["search", "epochs=3", "warmup_epochs=1", "max_steps_per_epoch=4", "data.name=synthetic",
          "data.synthetic_size=512", "data.input_size=28", "data.batch_size=32", "data.eval_batch_size=64",
          "derive.eval_batches=1", "progress=false", "threads=1"]
TRAIN = ["train", "data.name=synthetic", "epochs=2", "fold_epochs=2", "batch_size=32", "max_steps_per_epoch=4",
         "calib_batches=2", "eval_batch_size=64"]


def launch(args: list[str], run_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    resume = ["resume=true"] if (run_dir / "checkpoints" / "last.pt").is_file() else []
    return subprocess.Popen([sys.executable, "-m", "fbnas.cli", *args, *resume, f"hydra.run.dir={run_dir}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_lock(proc: subprocess.Popen, run_dir: Path) -> None:
    """Until the process holds the run directory (its imports and config are done) or has exited."""
    lock = run_dir / LOCK_NAME
    while proc.poll() is None:
        try:
            if json.loads(lock.read_text()).get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.005)


def finish(args: list[str], run_dir: Path) -> tuple[float, float]:
    """Run to the end; returns (seconds in all, seconds of work after the process took the directory)."""
    t0 = time.time()
    proc = launch(args, run_dir)
    wait_for_lock(proc, run_dir)
    t_lock = time.time()
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{run_dir}: exit {proc.returncode}: {err.strip()[-2000:]}")
    return time.time() - t0, time.time() - t_lock


def killed_run(args: list[str], run_dir: Path, kills: int, horizon: float, rng: random.Random) -> tuple[dict, int]:
    """Kill up to `kills` times at random moments (a relaunch may finish before its kill comes), then let it
    finish. Returns what the kills hit and how many landed."""
    landed = {"before_first_checkpoint": 0, "after_a_checkpoint": 0}
    done = 0
    while done < kills:
        had_ckpt = (run_dir / "checkpoints" / "last.pt").is_file()
        proc = launch(args, run_dir)
        wait_for_lock(proc, run_dir)
        try:
            proc.wait(timeout=rng.uniform(0, horizon))
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            done += 1
            landed["after_a_checkpoint" if had_ckpt else "before_first_checkpoint"] += 1
            continue
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{run_dir}: exit {proc.returncode}: {err.strip()[-2000:]}")
        return landed, done  # finished before its kill
    finish(args, run_dir)
    return landed, done


def tensors_sha(path: Path) -> str:
    """Of a safetensors file's tensors and metadata (its header's key order is not fixed, so not its bytes)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as fh:
        h.update(json.dumps(fh.metadata(), sort_keys=True).encode())
        for key in sorted(fh.keys()):
            t = fh.get_tensor(key)
            h.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def metrics_lines(run_dir: Path, drop: tuple[str, ...]) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if k not in drop}
            for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def search_result(run_dir: Path) -> dict:
    arch = json.loads((run_dir / "arch.json").read_text())
    return {"layers": arch["layers"], "predicted": arch["predicted"],
            "metrics": metrics_lines(run_dir, ("seconds", "data_seconds"))}


def train_result(run_dir: Path) -> dict:
    return {"metrics": json.loads((run_dir / "metrics.json").read_text()),
            "lines": metrics_lines(run_dir, ("seconds", "data_seconds")),
            "model": tensors_sha(run_dir / "model.safetensors"),
            "integer": tensors_sha(run_dir / "integer.safetensors")}


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def series(name: str, args: list[str], result, work: Path, total: int, kills: int, rng: random.Random) -> dict:
    ref = work / f"{name}_reference"
    wall, work_seconds = finish(args, ref)
    expected = result(ref)
    rows = []
    while sum(r["kills"] for r in rows) < total:
        run_dir = work / f"{name}_{len(rows)}"
        t0 = time.time()
        landed, n = killed_run(args, run_dir, min(kills, total - sum(r["kills"] for r in rows)), work_seconds, rng)
        same = result(run_dir) == expected
        rows.append({"run": len(rows), "kills": n, **landed, "identical": same, "seconds": round(time.time() - t0, 1)})
        print(f"{name} run {len(rows) - 1}: {n} kills ({landed}), identical to the uninterrupted run: {same}",
              flush=True)
    return {"uninterrupted_seconds": round(wall, 1), "work_seconds": round(work_seconds, 1), "runs": rows,
            "kills": sum(r["kills"] for r in rows), "identical": all(r["identical"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--total", type=int, default=20, help="kills per command, in all")
    ap.add_argument("--kills", type=int, default=5, help="kills per run directory at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/kill_resume")
    ap.add_argument("--out", default="bench/results/kill_resume.json")
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(a.seed)
    t0 = time.time()
    finish(SEARCH, work / "arch_source")  # the architecture the train runs train
    train = series("train", TRAIN + [f"arch={work / 'arch_source' / 'arch.json'}"], train_result, work, a.total,
                   a.kills, rng)
    search = series("search", SEARCH, search_result, work, a.total, a.kills, rng)
    out = {"search": search, "train": train, "wall_seconds": round(time.time() - t0, 1), "cpu": cpu_model(),
           "command": " ".join(["python bench/kill_resume.py"] + sys.argv[1:]), "settings": {"search": SEARCH,
                                                                                      "train": TRAIN}}
    atomic_write_json(a.out, out)
    print(f"search: {search['kills']} kills, identical {search['identical']}; train: {train['kills']} kills, "
          f"identical {train['identical']}; {out['wall_seconds']} s on {out['cpu']}; wrote {a.out}")


if __name__ == "__main__":
    main()

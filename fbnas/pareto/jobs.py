"""Training jobs of a Pareto study: one (network, seed) each, trained by fbnas.train.train with one recipe,
in N worker processes (spawn; on the CPU or sharing one CUDA device) or in this process. Every finished job
is its own JSON file, written atomically: a rerun skips it, and an interrupted training resumes from its
checkpoint."""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from ..arch import arch_from_dict
from ..checkpoint import LAST
from ..config import DatasetConfig, current_names
from ..errors import ConfigError, FbnasError
from ..io import atomic_write_json, read_json
from ..train import TrainSettings

log = logging.getLogger("fbnas")
RESULT_FORMAT = "fbnas-pareto-job/1"
# settings that do not change what is learned: a job trained on another accelerator is reused
NOT_RECIPE = ("seed", "accelerator", "eval_batch_size")


@dataclass(frozen=True)
class Job:
    arch_id: str
    name: str  # of the first network that needs it (a network may appear in several families)
    arch: dict
    seed: int

    @property
    def key(self) -> str:
        return f"{self.arch_id}__seed{self.seed}"


def recipe(settings: TrainSettings, data: DatasetConfig) -> dict:
    s = {k: v for k, v in asdict(settings).items() if k not in NOT_RECIPE}
    return {"train": s, "data": asdict(data)}


def result_path(out_dir: Path, job: Job) -> Path:
    return out_dir / "results" / f"{job.key}.json"


def load_result(path: Path, want_recipe: dict) -> Optional[dict]:
    """A finished job's result, or None; a result trained with another recipe is an error (one dir, one recipe)."""
    if not path.is_file():
        return None
    res = read_json(path, "result file not found")
    if isinstance(res.get("recipe"), dict) and isinstance(res["recipe"].get("train"), dict):
        res["recipe"]["train"] = current_names(res["recipe"]["train"])
    if res.get("recipe") != want_recipe:
        diff = _first_difference(res.get("recipe") or {}, want_recipe)
        raise ConfigError(f"{path}: trained with another recipe ({diff}); use another output directory "
                          "(hydra.run.dir=...) or the same settings")
    return res


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            if a != b:
                return _first_difference(a, b, f"{prefix}{k}.")
        elif a != b:
            return f"field '{prefix}{k}' was {a!r}, now {b!r}"
    return "unknown difference"


# ------------------------------------------------------------------------------------------- one job

_DATA_CACHE: dict = {}


def _dataset(data: DatasetConfig, arch):
    from ..data import load_data

    key = (tuple(sorted(asdict(data).items())), arch.input_size, arch.num_classes, arch.in_channels)
    if key not in _DATA_CACHE:
        # one fixed data seed: every network and training seed sees the same subset
        _DATA_CACHE[key] = load_data(data, 0, arch.input_size, arch.num_classes, arch.in_channels)
    return _DATA_CACHE[key]


def run_job(job: Job, settings: TrainSettings, data: DatasetConfig, out_dir: Path) -> dict:
    """Train one (network, seed) into out_dir/train/<arch id>/seed<k> (resuming its checkpoint) and write
    out_dir/results/<arch id>__seed<k>.json. Returns the result."""
    from ..train import train

    arch = arch_from_dict(job.arch, job.name)
    s = replace(settings, seed=job.seed)
    t0 = time.time()
    run_dir = out_dir / "train" / job.arch_id / f"seed{job.seed}"
    # an interrupted training continues from its checkpoint; a started one that never wrote one starts afresh
    metrics = train(arch, _dataset(data, arch), s, run_dir, resume=(run_dir / LAST).is_file())
    res = {"format": RESULT_FORMAT, "arch_id": job.arch_id, "name": job.name, "seed": job.seed,
           "acc_integer": metrics.get("acc_integer"), "acc_fake_quant": metrics.get("acc_fake_quant"),
           "acc_float_of_qat_weights": metrics.get("acc_float_of_qat_weights"),
           "integer_vs_fake_top1_disagreements": metrics.get("integer_vs_fake_top1_disagreements"),
           "seconds": round(time.time() - t0, 2), "accelerator": settings.accelerator,
           "recipe": recipe(settings, data)}
    atomic_write_json(result_path(out_dir, job), res)
    return res


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.getLogger("fbnas").setLevel(logging.WARNING)


def _worker_job(job: Job, settings: TrainSettings, data: DatasetConfig, out_dir: Path) -> dict:
    try:
        return run_job(job, settings, data, out_dir)
    except FbnasError as exc:  # returned, not raised: one failed training does not stop the others
        return {"error": f"{job.name} seed {job.seed}: {exc}"}


# ------------------------------------------------------------------------------------------- all jobs

@dataclass
class JobStats:
    total: int
    skipped: int
    trained: int


def run_jobs(jobs: list[Job], settings: TrainSettings, data: DatasetConfig, out_dir: Path, workers: int,
             threads: int = 0, progress: bool = True, job_fn: Callable = _worker_job) -> tuple[dict, JobStats]:
    """Run every job not finished yet; returns ({job key: result}, stats). Failed trainings are reported
    together at the end (the finished ones are kept); a rerun retries only them."""
    from tqdm.auto import tqdm

    want = recipe(settings, data)
    results, todo = {}, []
    for job in jobs:
        res = load_result(result_path(out_dir, job), want)
        if res is None:
            todo.append(job)
        else:
            results[job.key] = res
    stats = JobStats(len(jobs), len(jobs) - len(todo), 0)
    errors: list[str] = []
    bar = tqdm(total=len(jobs), initial=stats.skipped, desc="trainings", unit="net", disable=not progress,
               dynamic_ncols=True)

    def done(job: Job, res: dict) -> None:
        if "error" in res:
            errors.append(res["error"])
        else:
            results[job.key] = res
            stats.trained += 1
        bar.update(1)

    try:
        if workers <= 0:
            level = log.level
            log.setLevel(logging.WARNING)
            try:
                for job in todo:
                    done(job, job_fn(job, settings, data, out_dir))
            finally:
                log.setLevel(level)
        elif todo:
            _run_pool(todo, settings, data, out_dir, workers, threads, job_fn, done)
    finally:
        bar.close()
    if errors:
        raise FbnasError(f"{len(errors)} of {len(todo)} trainings failed (first: {errors[0]}); the other results "
                         f"are in {out_dir / 'results'} and a rerun retries only the failed ones")
    return results, stats


def _run_pool(todo: list[Job], settings: TrainSettings, data: DatasetConfig, out_dir: Path, workers: int,
              threads: int, job_fn: Callable, done: Callable[[Job, dict], None]) -> None:
    import multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        pending = {pool.submit(job_fn, job, settings, data, out_dir): job for job in todo}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job = pending.pop(fut)
                    done(job, fut.result())  # an unexpected exception propagates; finished results are on disk
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise

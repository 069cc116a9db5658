"""One run per directory: a second process on a locked run directory is refused in one line and touches
nothing; a lock left by a killed process is taken over; refused starts (missing field, resume without a
checkpoint, checkpoint without resume) create nothing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fbnas.cli import main
from fbnas.rundir import LOCK_NAME, RunDirBusy, acquire, release

REPO = Path(__file__).resolve().parent.parent
TINY = ["epochs=1", "warmup_epochs=0", "max_steps_per_epoch=2", "data.name=synthetic", "data.synthetic_size=256",
        "data.input_size=28", "data.batch_size=32", "data.eval_batch_size=64", "derive.eval_batches=1",
        "progress=false"]
HOLD = "import sys, time; from fbnas.rundir import acquire; acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)"


def holder(run_dir: Path) -> subprocess.Popen:
    """Another process that takes the lock of run_dir and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "held"
    return proc


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(d.rglob("*"))}


def test_second_process_is_refused_and_touches_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    proc = holder(run)
    try:
        before = snapshot(run)
        assert main(["search", *TINY, f"hydra.run.dir={run}"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"in use by another run (pid {proc.pid} on this host" in err, err
        assert snapshot(run) == before and list(before) == [LOCK_NAME]  # no .hydra/, no log, no metrics
    finally:
        proc.kill()
        proc.wait()
    # the holder died without releasing: its lock is stale and the next run takes it over, then releases it
    assert (run / LOCK_NAME).exists()
    assert main(["search", *TINY, f"hydra.run.dir={run}"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1]
    assert not (run / LOCK_NAME).exists()


def test_lock_of_another_host_or_live_pid_is_kept(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    with pytest.raises(RunDirBusy, match=f"host elsewhere.*delete {tmp_path / LOCK_NAME}"):
        acquire(tmp_path)
    (tmp_path / LOCK_NAME).unlink()
    lock = acquire(tmp_path)
    assert acquire(tmp_path) == lock  # this process again: re-entrant (the CLI locks before the library does)
    release(lock)
    assert not lock.exists()


def test_refused_starts_create_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "data.name=synthetic"]) == 2
    assert "field 'arch' is required" in capsys.readouterr().err
    assert main(["train", "arch=x.json", "resume=true", f"hydra.run.dir={tmp_path / 'r'}"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["search", *TINY, "resume=true", f"hydra.run.dir={tmp_path / 's'}"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_relaunch_without_resume_leaves_hydra_config_alone(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["search", *TINY, f"hydra.run.dir={run}"]) == 0
    before = snapshot(run)
    assert main(["search", *TINY, "seed=1", f"hydra.run.dir={run}"]) == 2
    assert "pass resume=true" in capsys.readouterr().err
    assert snapshot(run) == before

"""Several ranks under torchrun on CPU (gloo): 2 ranks x B/2 against 1 process x B, kill -9 and resume, resume on
another world size, distributed training, bad input (a batch that cannot be split, an unreachable master, more
ranks than GPUs), and a Hydra multirun through submitit_local."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY = ["epochs=3", "warmup_epochs=1", "max_steps_per_epoch=6", "data.name=synthetic", "data.synthetic_size=768",
        "data.eval_batch_size=64", "derive.eval_batches=2", "progress=false", "threads=1", "data.input_size=28",
        "report=false", "objective.beta=5.0", "optim.arch_lr=0.1"]
pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun not installed next to python")


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc, *args, timeout=300, popen=False):
    cmd = [str(TORCHRUN), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), "-m", "fbnas.cli", *args]
    if popen:
        return subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def plain(*args, extra_env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fbnas.cli", *args], env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def logits(run: Path) -> torch.Tensor:
    sd = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["supernet"]
    return torch.cat([v.flatten() for k, v in sorted(sd.items()) if k.endswith(("op_logits", "bit_logits"))])


def lines(run: Path) -> list[dict]:
    out = []
    for l in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(l)
        out.append({k: v for k, v in rec.items() if k not in ("seconds", "data_seconds")})
    return out


def layers(run: Path) -> list:
    return json.loads((run / "arch.json").read_text())["layers"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "two"
    r = launch(2, "search", *TINY, "data.batch_size=16", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_two_ranks_match_one_process_with_the_global_batch(two_ranks, tmp_path):
    one = tmp_path / "one"
    r = plain("search", *TINY, "data.batch_size=32", f"hydra.run.dir={one}")
    assert r.returncode == 0, r.stderr
    # only rank 0 wrote: one metrics line per epoch, one .hydra/, no second log
    assert [m["epoch"] for m in lines(two_ranks)] == [1, 2, 3] and lines(two_ranks)[0]["world_size"] == 2
    # BatchNorm normalises each rank's 16 images by their own statistics (no SyncBatchNorm on CPU), so the two
    # runs are not the same computation bit for bit: the logits agree in direction (single logits can differ by
    # most of their size: Adam's normalised step turns a small gradient difference into a full step), and the
    # architecture, which the strong latency term (beta=5, arch_lr 0.1) decides, exactly
    a, b = logits(two_ranks), logits(one)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.8, (a, b)
    # each run's derived op is, in the other run, one of the ops of that layer within 0.1 of the most probable
    # (layers whose two best ops cost about the same on the table can fall either way)
    probs = {run: lines(run)[-1]["op_probs"] for run in (two_ranks, one)}
    ops = json.loads((one / "arch.json").read_text())["provenance"]["config"]
    names = [c for c in __import__("fbnas").load_space(ops["space"]).candidates]
    for run, other in ((two_ranks, one), (one, two_ranks)):
        for l, layer in enumerate(layers(run)):
            p = probs[other][l]
            assert p[names.index(layer["op"])] >= max(p) - 0.1, (l, layer["op"], p)
    # the warm-up epoch trains weights only: its statistics agree closely
    assert abs(lines(two_ranks)[0]["ce"] - lines(one)[0]["ce"]) < 0.1


def test_kill_9_of_the_job_and_resume_equals_the_uninterrupted_run(two_ranks, tmp_path):
    run = tmp_path / "killed"
    args = ["search", *TINY, "data.batch_size=16", f"hydra.run.dir={run}"]
    p = launch(2, *args, popen=True)
    ckpt = run / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "finished before the kill"
    os.killpg(p.pid, signal.SIGKILL)  # torchrun and both ranks, as a lost node
    p.wait(timeout=30)
    r = launch(2, *args, "resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert layers(run) == layers(two_ranks)
    assert lines(run) == lines(two_ranks)


def test_resume_on_another_world_size(two_ranks, tmp_path):
    import shutil

    run = tmp_path / "moved"
    shutil.copytree(two_ranks, run, ignore=shutil.ignore_patterns(".fbnas.lock"))
    # global batch 32 (16 x 2) cannot be split over 3 ranks: one line, non-zero exit, nothing changed
    before = (run / "metrics.jsonl").read_text()
    t0 = time.time()
    r = launch(3, "search", *TINY, "epochs=4", "data.batch_size=16", "resume=true", f"hydra.run.dir={run}")
    assert r.returncode != 0 and time.time() - t0 < 60
    msg = [l for l in r.stderr.splitlines() if l.startswith("fbnas: error:")]
    assert len(msg) == 1 and "global batch 32 (16 per rank x 2 ranks) cannot be split over 3 ranks" in msg[0], r.stderr
    assert (run / "metrics.jsonl").read_text() == before
    # one process: the same command runs the global batch 32 as one batch of 32
    r = plain("search", *TINY, "epochs=4", "data.batch_size=16", "resume=true", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr
    m = lines(run)
    assert [x["epoch"] for x in m] == [1, 2, 3, 4] and m[-1]["world_size"] == 1 and m[-1]["step"] == 4 * 6


def test_distributed_training_reaches_the_accuracy_of_one_process(two_ranks, tmp_path):
    common = [f"arch={two_ranks / 'arch.json'}", "data.train_subset=3000", "data.test_subset=1000", "epochs=2",
              "fold_epochs=1", "calib_batches=2", "eval_batch_size=500"]
    r2 = launch(2, "train", *common, "batch_size=32", f"hydra.run.dir={tmp_path / 't2'}")
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = plain("train", *common, "batch_size=64", f"hydra.run.dir={tmp_path / 't1'}")
    assert r1.returncode == 0, r1.stderr
    m2 = json.loads((tmp_path / "t2" / "metrics.json").read_text())
    m1 = json.loads((tmp_path / "t1" / "metrics.json").read_text())
    assert m1["acc_integer"] > 40 and abs(m2["acc_integer"] - m1["acc_integer"]) < 3.0, (m1, m2)
    assert m2["integer_vs_fake_top1_disagreements"] == 0
    assert sorted(p.name for p in (tmp_path / "t2").iterdir() if p.suffix == ".log") == ["train.log"]


def test_unreachable_master_is_one_line_within_the_timeout(tmp_path):
    t0 = time.time()
    r = plain("search", "dist_timeout_s=2", f"hydra.run.dir={tmp_path / 'x'}",
              extra_env=dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(free_port())))
    assert r.returncode == 2 and time.time() - t0 < 30
    assert r.stderr.strip().count("\n") == 0 and "cannot join the process group at 127.0.0.1" in r.stderr
    assert not (tmp_path / "x").exists()


def test_more_ranks_than_gpus_is_one_line(monkeypatch):
    from fbnas import distributed
    from fbnas.errors import DistributedError

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    import torch.distributed as td

    td.init_process_group("gloo", rank=0, world_size=1)
    try:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        d = distributed.Dist(rank=0, world=1, local_rank=3, active=True)
        with pytest.raises(DistributedError, match=r"LOCAL_RANK 3 has no GPU: this node has 2 CUDA device\(s\).*"
                                                    r"--nproc_per_node 2"):
            d.device(torch.device("cuda"))
    finally:
        td.destroy_process_group()


def test_hydra_multirun_through_submitit_local(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    r = plain("search", "-m", "hydra/launcher=submitit_local", "seed=0,1", "epochs=1", "warmup_epochs=0",
              "max_steps_per_epoch=2", "data.name=synthetic", "data.synthetic_size=256", "data.batch_size=32",
              "data.eval_batch_size=64", "derive.eval_batches=1", "progress=false", "threads=1", "data.input_size=28",
              "report=false", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert r.returncode == 0, r.stderr
    archs = [json.loads((tmp_path / "sweep" / str(i) / "arch.json").read_text()) for i in (0, 1)]
    assert [a["provenance"]["seed"] for a in archs] == [0, 1]


def test_sync_reduces_buffers_where_they_are(monkeypatch):
    """Dist.sync makes a module's float buffers views of flat tensors, all-reduced in place: the module still
    updates them as before, a one-rank sync changes no value, running_min is reduced as a min, and buffers
    replaced by `.to(...)` are picked up again."""
    import torch.distributed as td
    import torch.nn as nn

    from fbnas import distributed
    from fbnas.quant.act import ActQuantizer

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    td.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = nn.ModuleDict({"body": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "act": ActQuantizer()})
        net.act.observe(-torch.rand(8))  # signed: running_min = -running_max
        net.body(torch.randn(2, 3, 8, 8)).sum().backward()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        grads = [p.grad.clone() for p in net.parameters()]
        d = distributed.Dist(rank=0, world=1, active=True)
        d.sync(list(net.parameters()), net)
        for k, v in net.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
        flat = d._flat_buffers[id(net)]
        bn = net.body[1]
        assert float(net.act.running_min) < 0 and bn.running_mean.data_ptr() in {
            f.data_ptr() + 4 * i for f in flat.averaged for i in range(f.numel())}
        net.body(torch.randn(2, 3, 8, 8))  # BatchNorm's in-place update lands in the flat tensor
        assert torch.equal(flat.averaged[0][:4], bn.running_mean) and not torch.equal(bn.running_mean,
                                                                                       before["body.1.running_mean"])
        net.double()
        assert not flat.in_place()
        d.sync(list(net.parameters()), net)
        assert d._flat_buffers[id(net)].in_place() and bn.running_var.dtype == torch.float64
    finally:
        td.destroy_process_group()

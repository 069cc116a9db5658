"""`fbnas search` end to end (tiny settings, synthetic-sized data) and its bad-input behaviour."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TINY = ["epochs=2", "warmup_epochs=1", "max_steps_per_epoch=3", "data.name=synthetic", "data.synthetic_size=512",
        "data.batch_size=32", "data.eval_batch_size=64", "derive.eval_batches=1", "progress=false", "threads=1"]


def fbnas(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "fbnas.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def synthetic_space(tmp_path, **changes):
    raw = yaml.safe_load((REPO / "search_spaces" / "fmnist.yaml").read_text())
    raw.update(changes)
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "run"
    r = fbnas("search", *TINY, "data.input_size=28", "data.synthetic_classes=10", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    return out, r


def test_search_writes_arch_metrics_checkpoint(search_run):
    out, r = search_run
    arch = json.loads((out / "arch.json").read_text())
    assert arch["format"] == "fbnas-arch/1" and arch["space"] == "fmnist"
    assert len(arch["layers"]) == 6
    assert arch["predicted"]["sd835"]["latency_ms"] > 0
    assert arch["provenance"]["lut_sha256"] and arch["provenance"]["device"] == "sd835"
    # the sd835 runtime runs W8A8 only (conf/device/sd835.yaml `bits`): the search offers nothing else
    assert {(l["w_bits"], l["a_bits"]) for l in arch["layers"]} == {(8, 8)}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
    assert (out / "checkpoints" / "last.pt").is_file()
    assert "predicted latency on sd835" in r.stdout


def test_same_seed_same_arch(search_run, tmp_path):
    out, _ = search_run
    r = fbnas("search", *TINY, "data.input_size=28", f"hydra.run.dir={tmp_path / 'again'}")
    assert r.returncode == 0, r.stderr
    a = json.loads((out / "arch.json").read_text())["layers"]
    b = json.loads((tmp_path / "again" / "arch.json").read_text())["layers"]
    assert a == b


def test_resume_continues_and_refuses_to_overwrite(search_run, tmp_path):
    out, _ = search_run
    r = fbnas("search", *TINY, "data.input_size=28", f"hydra.run.dir={out}")
    assert r.returncode == 2 and "resume=true" in r.stderr and "Traceback" not in r.stderr
    more = [t if not t.startswith("epochs=") else "epochs=3" for t in TINY]
    r = fbnas("search", *more, "data.input_size=28", "data.synthetic_classes=10", "resume=true", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    epochs = [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.parametrize("case", ["malformed_yaml", "unknown_op", "bits_out_of_range", "lut_missing_keys",
                                  "missing_dataset", "unknown_device"])
def test_bad_input_one_line_exit_2_no_output(case, tmp_path):
    out = tmp_path / "run"
    args = ["search", *TINY, f"hydra.run.dir={out}"]
    if case == "malformed_yaml":
        p = tmp_path / "bad.yaml"
        p.write_text("name: x\nstages: [ {channels: 3\n")
        args.append(f"space={p}")
        expect = "bad.yaml: line"
    elif case == "unknown_op":
        args.append(f"space={synthetic_space(tmp_path, candidates=['ir_k3_e1', 'conv_magic'])}")
        expect = "unknown op 'conv_magic'"
    elif case == "bits_out_of_range":
        args.append(f"space={synthetic_space(tmp_path, bits={'weights': [2, 16], 'activations': [8]})}")
        expect = "bit-widths must be integers in 1..8"
    elif case == "lut_missing_keys":
        lut = json.loads((REPO / "latency_tables" / "fmnist__sd835.json").read_text())
        dropped = sorted(k for k in lut["entries"] if k.startswith("ir_k3_e6") and k.endswith("w8a8"))[:3]
        for k in dropped:
            del lut["entries"][k]
        p = tmp_path / "partial.json"
        p.write_text(json.dumps(lut))
        args.append(f"lut={p}")
        expect = dropped[0]
    elif case == "missing_dataset":
        args = [a for a in args if not a.startswith("data.name")] + ["data.name=cifar10", f"data.root={tmp_path}/nothing",
                                                                     "space=mixed"]
        expect = "cifar10 not found"
    else:
        args.append("device=pixel9000")
        expect = "unknown device 'pixel9000'"
    r = fbnas(*args)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fbnas: error:") and expect in err[0], r.stderr
    assert not out.exists()

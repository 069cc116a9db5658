"""Checkpoints are data: every loader refuses a pickle payload before it can run, and the real checkpoints that
fbnas writes load with weights_only=True (search resume, train resume, hessian checkpoint=, train init=supernet)."""
import pickle
import re
from pathlib import Path

import pytest
import torch

from fbnas import Arch, load_space
from fbnas.cli import main
from fbnas.config import DataConfig, DeriveConfig, SearchConfig
from fbnas.data import load_dataset
from fbnas.errors import CheckpointError
from fbnas.search import CHECKPOINT_FORMAT, run_search
from fbnas.train import TrainSettings, train

REPO = Path(__file__).resolve().parent.parent
TINY_TRAIN = dict(epochs=1, fold_epochs=1, batch_size=32, max_steps_per_epoch=2, calib_batches=1, eval_batch_size=64)


class Payload:
    """Unpickling this creates the marker file (what a hostile checkpoint would do with a shell command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def evil_checkpoint(path: Path, marker: Path, fmt: str = CHECKPOINT_FORMAT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": fmt, "supernet": {}, "space": "fmnist", "payload": Payload(marker)}, path)
    return path


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "pwned"
    evil_checkpoint(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)  # what a pickle loader would do
    assert marker.exists()


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory):
    """A real (tiny) search run: arch.json and checkpoints/last.pt."""
    out = tmp_path_factory.mktemp("search")
    cfg = SearchConfig(epochs=1, warmup_epochs=0, max_steps_per_epoch=2, progress=False, threads=1,
                       data=DataConfig(name="synthetic", synthetic_size=256, batch_size=32, eval_batch_size=64,
                                       input_size=28),
                       derive=DeriveConfig(eval_batches=1, calibration_batches=1))
    run_search(cfg, out)
    return out


def test_search_checkpoint_is_plain_data(search_dir):
    state = torch.load(search_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT
    assert state["rng"]["numpy_keys"].shape == (624,) and len(state["rng"]["python_internal"]) == 625


def test_train_init_supernet_from_a_real_search_checkpoint(search_dir, tmp_path):
    from fbnas.arch import load_arch
    from fbnas.model import build_model
    from fbnas.quant.artifacts import load_supernet_into

    arch = load_arch(search_dir / "arch.json")
    ckpt = torch.load(search_dir / "checkpoints" / "last.pt", weights_only=True)
    net = build_model(arch)
    load_supernet_into(net, arch, search_dir / "checkpoints" / "last.pt")
    ops = list(load_space("fmnist").candidates)
    for l, layer in enumerate(arch.layers):  # every child tensor is the supernet's tensor of the chosen op
        prefix = f"mixed_layers.{l}.ops.{ops.index(layer.op)}."
        for k, v in net.layers[l].state_dict().items():
            assert torch.equal(v, ckpt["supernet"][prefix + k]), (l, k)
    for k, v in net.stem.state_dict().items():
        assert torch.equal(v, ckpt["supernet"]["stem." + k]), k
    data = load_dataset("synthetic", synthetic_size=128, input_size=28, in_channels=1, num_classes=10)
    m = train(arch, data, TrainSettings(init="supernet", supernet=str(search_dir / "checkpoints" / "last.pt"),
                                        **TINY_TRAIN), tmp_path / "t")
    assert m["acc_integer"] == m["acc_fake_quant"]


def _refused(exc_info, marker):
    assert "refused" in str(exc_info.value) and "\n" not in str(exc_info.value)
    assert not marker.exists()


def test_search_resume_refuses_a_pickle(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    evil_checkpoint(run / "checkpoints" / "last.pt", marker)
    rc = main(["search", "resume=true", f"hydra.run.dir={run}", "data.name=synthetic", "data.input_size=28",
               "data.synthetic_size=256", "data.batch_size=32", "epochs=1", "progress=false"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "refused" in err and "\n" not in err, err
    assert not marker.exists()


def test_train_resume_refuses_a_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil_checkpoint(tmp_path / "checkpoints" / "last.pt", marker, "fbnas-train-checkpoint/1")
    arch = Arch.from_space(load_space("fmnist"), ["skip"] * 6, 8, 8)
    data = load_dataset("synthetic", synthetic_size=128, input_size=28, in_channels=1, num_classes=10)
    with pytest.raises(CheckpointError) as exc:
        train(arch, data, TrainSettings(**TINY_TRAIN), tmp_path, resume=True)
    _refused(exc, marker)


def test_train_init_supernet_refuses_a_pickle(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = evil_checkpoint(tmp_path / "last.pt", marker)
    arch = Arch.from_space(load_space("fmnist"), ["skip"] * 6, 8, 8)
    data = load_dataset("synthetic", synthetic_size=128, input_size=28, in_channels=1, num_classes=10)
    with pytest.raises(CheckpointError) as exc:
        train(arch, data, TrainSettings(init="supernet", supernet=str(ckpt), **TINY_TRAIN), tmp_path / "t")
    _refused(exc, marker)


def test_hessian_checkpoint_refuses_a_pickle(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = evil_checkpoint(tmp_path / "checkpoints" / "last.pt", marker)
    assert main(["hessian", f"checkpoint={ckpt}", "data.name=synthetic", "plot=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert "refused" in err and "\n" not in err and not marker.exists()
    assert not (tmp_path / "hessian.json").exists()


def test_old_format_checkpoint_is_one_line(tmp_path):
    import numpy as np

    from fbnas.checkpoint import load_checkpoint

    old = tmp_path / "old.pt"
    torch.save({"format": "fbnas-search-checkpoint/1", "rng": {"numpy": np.random.get_state()}}, old)
    with pytest.raises(CheckpointError, match="refused") as exc:
        load_checkpoint(old, CHECKPOINT_FORMAT)
    assert "\n" not in str(exc.value)
    torch.save({"format": "fbnas-search-checkpoint/1"}, old)
    with pytest.raises(CheckpointError, match=r"format fbnas-search-checkpoint/2 \(it is fbnas-search-checkpoint/1\)"):
        load_checkpoint(old, CHECKPOINT_FORMAT)


def test_no_pickle_loading_anywhere_in_the_code():
    """Every torch.load in the package and the bench scripts goes through weights_only=True."""
    for path in list((REPO / "fbnas").rglob("*.py")) + list((REPO / "bench").rglob("*.py")):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "pickle.load" not in path.read_text(), path


def test_hessian_on_a_real_train_run(tmp_path, capsys):
    arch = Arch.from_space(load_space("fmnist"), ["ir_k3_e1", "skip", "shuffle_k3", "sqnxt_k3", "skip", "skip"], 4, 8)
    data = load_dataset("synthetic", synthetic_size=128, input_size=28, in_channels=1, num_classes=10)
    run = tmp_path / "run"
    train(arch, data, TrainSettings(**TINY_TRAIN), run)
    fast = ["data.name=synthetic", "batches=1", "batch_size=8", "max_probes=4", "min_probes=2", "method=loop",
            "plot=false", "threads=1"]
    assert main(["hessian", f"arch={run / 'arch.json'}", f"weights={run / 'model.safetensors'}", *fast]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"use {run / 'model_bn.safetensors'}" in err, err
    assert main(["hessian", f"arch={run / 'arch.json'}", f"weights={run / 'model_bn.safetensors'}", *fast]) == 0
    assert (run / "hessian.json").is_file()


def test_corrupt_train_checkpoint_is_one_line_without_a_dead_end(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 torn")
    arch = Arch.from_space(load_space("fmnist"), ["skip"] * 6, 8, 8)
    data = load_dataset("synthetic", synthetic_size=128, input_size=28, in_channels=1, num_classes=10)
    with pytest.raises(CheckpointError, match="cannot read the train checkpoint") as exc:
        train(arch, data, TrainSettings(**TINY_TRAIN), tmp_path, resume=True)
    assert "resume=false" not in str(exc.value) and "\n" not in str(exc.value)

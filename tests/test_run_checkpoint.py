"""The checkpoint helper search and train share (fbnas.checkpoint.RunCheckpoint) and the data config they share
(fbnas.config.DatasetConfig, extended by the search's DataConfig)."""
import pytest
import torch

from fbnas import __version__
from fbnas.checkpoint import RunCheckpoint
from fbnas.config import DataConfig, DatasetConfig, ParetoConfig, SearchConfig, TrainConfig
from fbnas.errors import CheckpointError
from fbnas.search import CHECKPOINT_FORMAT as SEARCH_FORMAT
from fbnas.train_resume import CHECKPOINT_FORMAT as TRAIN_FORMAT, train_checkpoint


def test_save_then_open_adds_format_and_version(tmp_path):
    ckpt = train_checkpoint(tmp_path)
    assert ckpt.open(resume=False) is None  # a fresh start in an empty directory
    ckpt.save({"epoch": 3, "w": torch.ones(2)})
    state = ckpt.open(resume=True)
    assert state["format"] == TRAIN_FORMAT and state["fbnas_version"] == __version__ and state["epoch"] == 3
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))  # written atomically: no temp file left


def test_open_refuses_starts_that_do_not_match_the_directory(tmp_path):
    ckpt = RunCheckpoint(tmp_path, SEARCH_FORMAT, "search checkpoint")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        ckpt.open(resume=True)
    ckpt.save({})
    with pytest.raises(CheckpointError, match="exists: pass resume=true"):
        ckpt.open(resume=False)
    other = RunCheckpoint(tmp_path, TRAIN_FORMAT, "train checkpoint")  # a search run resumed as a training
    with pytest.raises(CheckpointError, match=f"format {TRAIN_FORMAT} \\(it is {SEARCH_FORMAT}\\); .*new run"):
        other.open(resume=True)


def test_corrupt_checkpoint_names_the_file_and_the_fix(tmp_path):
    ckpt = train_checkpoint(tmp_path)
    ckpt.path.parent.mkdir()
    ckpt.path.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(CheckpointError) as exc:
        ckpt.open(resume=True)
    msg = str(exc.value)
    assert msg.startswith(str(ckpt.path)) and "corrupt" in msg and "intact copy" in msg and "\n" not in msg


def test_search_and_train_share_one_data_config():
    assert isinstance(SearchConfig().data, DatasetConfig) and type(TrainConfig().data) is DatasetConfig
    assert type(ParetoConfig().data) is DatasetConfig
    assert SearchConfig().data.train_subset == 10000 and TrainConfig().data.train_subset == 0  # per-command defaults
    train_args = DatasetConfig(name="synthetic", train_subset=64).load_args(28, 10)
    assert train_args == {"name": "synthetic", "root": None, "train_subset": 64, "test_subset": 0, "input_size": 28,
                          "num_classes": 10}
    search_args = DataConfig(name="synthetic", input_size=16, synthetic_classes=3).load_args(28, 10)
    assert search_args["input_size"] == 16 and search_args["num_classes"] == 3 and search_args["split_arch"] == 0.2

"""Your own data: a tiny generated ImageFolder through search (space adapted to the data), train (checkpoints),
export (class names and preprocessing in arch.json, the model card and ONNX metadata); synthetic data follow the
space; space overrides from the command line."""
import json

import numpy as np
import pytest
from PIL import Image

from fbnas.arch import load_arch
from fbnas.cli import main as cli
from fbnas.config import SearchConfig
from fbnas.data import IMAGENET_MEAN, IMAGENET_STD
from fbnas.errors import ConfigError
from fbnas.search import Searcher
from fbnas.space import load_space, override_io

CLASSES = ["cat", "dog", "frog"]
TINY_SEARCH = ["epochs=1", "warmup_epochs=0", "max_steps_per_epoch=2", "data.batch_size=4", "data.eval_batch_size=8",
               "derive.eval_batches=1", "derive.calibration_batches=1", "progress=false", "threads=1"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 classes of 28x28 RGB PNGs, each class a colour plus noise; train/ and val/."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (28, 28, 3)) + np.eye(3, dtype=np.int64)[c] * 180
                Image.fromarray(img.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_imagefolder_search_train_export_carries_class_names(image_folder, tmp_path, capsys):
    import onnx

    data = [f"data.name=imagefolder", f"data.root={image_folder}"]
    search_dir = tmp_path / "search"
    assert cli(["search", *TINY_SEARCH, *data, f"hydra.run.dir={search_dir}"]) == 2  # fmnist is 1x28x28, 10 classes
    assert "space_override.from_data=true" in capsys.readouterr().err
    assert not search_dir.exists()
    assert cli(["search", *TINY_SEARCH, *data, "space_override.from_data=true", f"hydra.run.dir={search_dir}"]) == 0
    arch = load_arch(search_dir / "arch.json")
    assert (arch.in_channels, arch.input_size, arch.num_classes, arch.space) == (3, 28, 3, "fmnist_3x28_3cls")
    assert arch.preprocessing["classes"] == CLASSES and arch.preprocessing["mean"] == list(IMAGENET_MEAN)
    assert load_space(search_dir / "space.yaml").num_classes == 3  # the derived space, kept with the run
    capsys.readouterr()

    train_dir = tmp_path / "train"
    assert cli(["train", f"arch={search_dir / 'arch.json'}", *data, "epochs=1", "fold_epochs=1", "batch_size=4",
                "max_steps_per_epoch=2", "calib_batches=1", "eval_batch_size=8", f"hydra.run.dir={train_dir}"]) == 0
    assert (train_dir / "checkpoints" / "last.pt").is_file() and (train_dir / "model.safetensors").is_file()
    assert load_arch(train_dir / "arch.json").preprocessing["classes"] == CLASSES

    export_dir = tmp_path / "export"
    assert cli(["export", f"run={train_dir}", f"out={export_dir}", "formats=[arch,onnx_fp32,onnx_qdq,card]"]) == 0
    for name in ("model_fp32.onnx", "model_qdq.onnx"):
        meta = {p.key: p.value for p in onnx.load(str(export_dir / name)).metadata_props}
        assert json.loads(meta["classes"]) == CLASSES and meta["input_layout"] == "NCHW"
        assert json.loads(meta["mean"]) == list(IMAGENET_MEAN) and json.loads(meta["std"]) == list(IMAGENET_STD)
        assert json.loads(meta["input_shape"]) == ["N", 3, 28, 28]
    card = (export_dir / "model_card.md").read_text()
    assert "0: cat, 1: dog, 2: frog" in card and str(list(IMAGENET_MEAN)) in card


def test_synthetic_data_follow_the_space_and_overrides_apply(tmp_path):
    cfg = SearchConfig(space="fmnist28", epochs=1, warmup_epochs=0, max_steps_per_epoch=1, progress=False)
    cfg.data.name, cfg.data.synthetic_size, cfg.data.batch_size = "synthetic", 256, 32
    s = Searcher(cfg, tmp_path / "a")
    assert s.data.input_size == 28 and s.data.num_classes == 10 and tuple(s.data.train.x.shape[1:]) == (1, 28, 28)
    cfg.space_override.num_classes, cfg.space_override.input_size = 4, 32
    s = Searcher(cfg, tmp_path / "b")
    assert s.space.name == "fmnist28_1x32_4cls" and (s.space.input_size, s.space.num_classes) == (32, 4)
    assert s.data.input_size == 32 and s.data.num_classes == 4
    assert load_space(tmp_path / "b" / "space.yaml") == s.space
    assert s.latency.table.device == "sd835" and s.latency.matrix.shape[0] == 6  # analytic table built for it


def test_override_io_validates_and_keeps_the_rest():
    space = load_space("fmnist")
    assert override_io(space) is space and override_io(space, 1, 28, 10) is space
    new = override_io(space, in_channels=3, num_classes=5)
    assert (new.name, new.in_channels, new.input_size, new.num_classes) == ("fmnist_3x28_5cls", 3, 28, 5)
    assert new.stages == space.stages and new.candidates == space.candidates
    with pytest.raises(ConfigError, match="space_override.num_classes"):
        override_io(space, num_classes=0)
    assert load_space("fmnist_3x28_5cls") == new  # a derived name loads anywhere a space name does
    with pytest.raises(ConfigError, match="search space not found"):
        load_space("nospace_3x28_5cls")

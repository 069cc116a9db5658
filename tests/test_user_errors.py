"""Bad input as a careless user gives it: one line on stderr, exit 2, no traceback, nothing left behind; no
silent fallback to another file than the one given."""
import json
from pathlib import Path

import pytest
import yaml

from fbnas import Arch, load_space
from fbnas.apps.common import one_line
from fbnas.cli import main
from fbnas.data import load_dataset
from fbnas.errors import ConfigError, DataError
from fbnas.io import repo_root
from fbnas.space import load_space as load_space_file
from fbnas.train import TrainSettings, train

REPO = repo_root()
TINY = ["epochs=1", "warmup_epochs=0", "max_steps_per_epoch=2", "data.name=synthetic", "data.synthetic_size=256",
        "data.input_size=28", "data.batch_size=32", "data.eval_batch_size=64", "derive.eval_batches=1",
        "progress=false"]


def one_line_error(capsys, argv: list, expect: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fbnas: error:") and "Traceback" not in err, err
    assert expect in err, err
    return err


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    arch = Arch.from_space(load_space("fmnist"), ["ir_k3_e1", "skip", "skip", "skip", "skip", "skip"], 8, 8)
    data = load_dataset("synthetic", synthetic_size=128, input_size=28, in_channels=1, num_classes=10)
    train(arch, data, TrainSettings(epochs=1, fold_epochs=1, batch_size=32, max_steps_per_epoch=1, calib_batches=1,
                                    eval_batch_size=64), out)
    return out


def test_missing_lut_file_is_an_error_not_the_analytic_table(tmp_path, capsys):
    one_line_error(capsys, ["search", *TINY, f"lut={tmp_path / 'nope.json'}", f"hydra.run.dir={tmp_path / 'r'}"],
                   "nope.json: latency table not found (field 'lut')")
    assert not (tmp_path / "r").exists()


def test_missing_data_root_is_an_error_not_the_system_copy(tmp_path, capsys):
    with pytest.raises(DataError, match="data.root=/nonexistent: directory not found"):
        load_dataset("fashion_mnist", root="/nonexistent")
    arch = Arch.from_space(load_space("fmnist"), ["skip"] * 6, 8, 8)
    arch.save(tmp_path / "arch.json")
    one_line_error(capsys, ["train", f"arch={tmp_path / 'arch.json'}", "data.root=/nonexistent",
                            f"hydra.run.dir={tmp_path / 'r'}"], "directory not found")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content, expect", [
    (b"key,p50\nir_k3_e1|14x14|16->16|s1|w8a8,0.1,0.2\n", "line 2: 1 value(s) more than the 2 columns"),
    (b"key,p50\n\xff\xfe,0.1\n", "not UTF-8 text"),
    (b"key,p50\n\"unterminated,0.1\x00\n", "m.csv"),
])
def test_lut_import_bad_csv(tmp_path, capsys, content, expect):
    (tmp_path / "m.csv").write_bytes(content)
    one_line_error(capsys, ["lut", "import", "device=sd835", f"csv={tmp_path / 'm.csv'}", f"out={tmp_path / 't.json'}"],
                   expect)
    assert not (tmp_path / "t.json").exists()


def test_export_to_an_unusable_path_and_without_run(train_run, capsys):
    one_line_error(capsys, ["export", f"run={train_run}", "formats=[arch]", "out=/dev/null/x"],
                   "/dev/null/x: Not a directory")
    one_line_error(capsys, ["export"], "field 'run' is required")


@pytest.mark.parametrize("change, expect", [
    ({"stages": [{"channels": 10000000, "repeats": 1, "stride": 1}]}, "'stages[0].channels' is 10000000; at most"),
    ({"stages": [{"channels": 16, "repeats": 100000, "stride": 1}]}, "'stages[0].repeats' is 100000; at most"),
    ({"input": {"channels": 1, "size": 100000}}, "'input.size' is 100000; at most"),
    ({"head": {"channels": 99999}}, "'head.channels' is 99999; at most"),
])
def test_space_size_limits_before_allocation(tmp_path, change, expect):
    raw = yaml.safe_load((REPO / "search_spaces" / "fmnist.yaml").read_text())
    raw.update(change)
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        load_space_file(tmp_path / "big.yaml")


def test_all_zero_latency_table_is_blamed_on_the_table(tmp_path, capsys):
    lut = json.loads((REPO / "latency_tables" / "fmnist__sd835.json").read_text())
    for e in lut["entries"].values():
        e.update(p10=0.0, p50=0.0, p90=0.0)
    (tmp_path / "zero.json").write_text(json.dumps(lut))
    err = one_line_error(capsys, ["search", *TINY, f"lut={tmp_path / 'zero.json'}", f"hydra.run.dir={tmp_path / 'r'}"],
                         "a latency penalty needs a table with positive latencies")
    assert "w_lr" not in err and "checkpoint" not in err
    assert not (tmp_path / "r").exists()


def test_lut_predict_of_an_arch_from_another_space(tmp_path, capsys):
    arch = Arch.from_space(load_space("fmnist_deep"), ["skip"] * 14, 8, 8)
    arch.save(tmp_path / "deep.json")
    one_line_error(capsys, ["lut", "predict", "space=fmnist", "device=sd835", f"archs={tmp_path / 'deep.json'}"],
                   "is of space 'fmnist_deep', not 'fmnist'; pass space=fmnist_deep")


def test_error_text_is_one_printable_line():
    assert one_line("bad \x1b[1mthing\x1b[0m\n  second line\n") == "bad thing; second line"


def test_any_failed_start_leaves_no_run_directory(tmp_path, monkeypatch, capsys):
    arch = Arch.from_space(load_space("fmnist"), ["skip"] * 6, 8, 8)
    arch.save(tmp_path / "arch.json")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("fbnas.train.train", broken)  # the app imports it when it runs
    assert main(["train", f"arch={tmp_path / 'arch.json'}", "data.name=synthetic",
                 f"hydra.run.dir={tmp_path / 'r'}"]) != 0
    assert "RuntimeError: a bug" in capsys.readouterr().err  # a bug keeps its traceback ...
    assert not (tmp_path / "r").exists()  # ... and still leaves nothing behind

"""`fbnas train`: progress bar, threads, wandb logging under a run id kept in the run directory (a resume continues
the same wandb run; sweep jobs named 0, 1, ... in different sweeps get different ids); old field names still work."""
import sys
import types

from fbnas.arch import Arch
from fbnas.cli import main
from fbnas.wandb_run import ID_FILE, run_id


class _FakeWandb(types.ModuleType):
    """Records wandb.init arguments and logged rows (the real package would start its service process)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.rows, self.summaries = [], [], []

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            summary: dict = {}

            def log(self, row, step=None):
                fake.rows.append(row)

            def finish(self):
                fake.summaries.append(dict(self.summary))

        run = Run()
        run.summary = {}
        return run


def test_run_ids_are_unique_per_directory_and_stable(tmp_path):
    a, b = tmp_path / "sweep1" / "0", tmp_path / "sweep2" / "0"
    a.mkdir(parents=True), b.mkdir(parents=True)
    ida, idb = run_id(a), run_id(b)
    assert ida != idb and ida.startswith("0-") and run_id(a) == ida
    assert (a / ID_FILE).read_text().strip() == ida


def test_train_logs_to_wandb_with_a_progress_bar_and_resumes_the_same_run(fmnist, tmp_path, capsys, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    Arch.from_space(fmnist, ["ir_k3_e1", "skip", "skip", "skip", "skip", "ir_k3_e1"], 8, 8).save(tmp_path / "a.json")
    run_dir = tmp_path / "run"
    args = ["train", f"arch={tmp_path / 'a.json'}", "data.name=synthetic", "epochs=1", "fold_epochs=1",
            "batch_size=32", "calib_batches=1", "eval_batch_size=64", "threads=1", "logger=wandb",
            f"hydra.run.dir={run_dir}"]
    assert main([*args, "steps_per_epoch=2"]) == 0  # the old name of max_steps_per_epoch
    err = capsys.readouterr().err
    assert "field 'steps_per_epoch' is now 'max_steps_per_epoch'" in err
    assert "bn epoch 1/1" in err and "folded epoch 1/1" in err  # the progress bars
    first = fake.inits[0]
    assert first["id"] == (run_dir / ID_FILE).read_text().strip() and first["resume"] == "allow"
    assert first["config"]["max_steps_per_epoch"] == 2 and first["job_type"] == "train"
    assert [sorted(r) for r in fake.rows] == [
        ["bn/data_seconds", "bn/epoch", "bn/loss", "bn/lr", "bn/seconds", "bn/test_acc", "bn/train_acc",
         "bn/world_size"],
        ["folded/data_seconds", "folded/epoch", "folded/loss", "folded/lr", "folded/seconds", "folded/test_acc",
         "folded/train_acc", "folded/world_size"]]
    assert "acc_integer" in fake.summaries[0]
    assert main([*args, "max_steps_per_epoch=2", "resume=true", "progress=false"]) == 0
    assert fake.inits[1]["id"] == first["id"]  # the same wandb run continues
    assert "epoch 1/1" not in capsys.readouterr().err


def test_train_refuses_an_unknown_logger_in_one_line(fmnist, tmp_path, capsys):
    Arch.from_space(fmnist, ["skip"] * 6, 8, 8).save(tmp_path / "a.json")
    assert main(["train", f"arch={tmp_path / 'a.json'}", "data.name=synthetic", "logger=tensorboard",
                 f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fbnas: error: field 'logger' is 'tensorboard'; use none or wandb"
    assert not (tmp_path / "run").exists()


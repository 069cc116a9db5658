"""Resume checks the settings that determine the result, extends the schedules when `epochs` changes, and
keeps metrics.jsonl to the checkpoint's epochs (a torn or extra line never breaks or duplicates)."""
import dataclasses
import json

import pytest

from fbnas.config import DataConfig, DeriveConfig, SearchConfig
from fbnas.errors import CheckpointError, ConfigError, NonFiniteLossError
from fbnas.search import Searcher, run_search
from fbnas.supernet import MODES


def tiny(**kw) -> SearchConfig:
    cfg = SearchConfig(epochs=2, warmup_epochs=0, max_steps_per_epoch=3, progress=False, threads=1,
                       data=DataConfig(name="synthetic", synthetic_size=256, batch_size=32, eval_batch_size=64,
                                       input_size=28),
                       derive=DeriveConfig(eval_batches=1, calibration_batches=1))
    return dataclasses.replace(cfg, **kw)


def epochs_of(run) -> list[int]:
    return [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    (out / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")  # a start killed before its first checkpoint
    run_search(tiny(), out)
    assert epochs_of(out) == [1, 2]
    return out


@pytest.mark.parametrize("change, named", [
    (dict(seed=1), "seed=0 (now 1)"),
    (dict(mode="hard"), "mode='soft' (now 'hard')"),
    (dict(mode="two_path", anchor_steps=4), "anchor_steps=1 (now 4)"),
    (dict(objective=dataclasses.replace(SearchConfig().objective, beta=3.0)), "objective.beta=0.6 (now 3.0)"),
    (dict(data=dataclasses.replace(tiny().data, synthetic_size=512)), "data.synthetic_size=256 (now 512)"),
    (dict(device="a11"), "device='sd835' (now 'a11')"),
])
def test_resume_refuses_other_settings_naming_them(finished, change, named):
    with pytest.raises(CheckpointError) as exc:
        Searcher(tiny(resume=True, **change), finished).run()
    assert named in str(exc.value) and "\n" not in str(exc.value)


def test_resume_refuses_an_edited_space_file(tmp_path, monkeypatch):
    import yaml

    from fbnas.io import repo_root

    raw = yaml.safe_load((repo_root() / "search_spaces" / "fmnist.yaml").read_text())
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(raw))
    # bitfusion runs every bit pair, so the space's bit choices are the search's
    interrupted(tmp_path / "run", tiny(space=str(tmp_path / "space.yaml"), device="bitfusion"), 1, monkeypatch)
    raw["bits"]["weights"] = [4, 8]  # same name, other bit choices
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(CheckpointError, match=r"space_definition.bits.weights=\[2, 4, 8\] \(now \[4, 8\]\)"):
        Searcher(tiny(space=str(tmp_path / "space.yaml"), device="bitfusion", resume=True), tmp_path / "run").run()


def test_resume_refuses_another_latency_table(finished, tmp_path):
    from fbnas.io import repo_root

    lut = json.loads((repo_root() / "latency_tables" / "fmnist__sd835.json").read_text())
    for e in lut["entries"].values():
        for k in ("p10", "p50", "p90"):
            e[k] *= 2
    (tmp_path / "lut.json").write_text(json.dumps(lut))
    with pytest.raises(CheckpointError, match="latency table="):
        Searcher(tiny(resume=True, lut=str(tmp_path / "lut.json")), finished).run()


class Stop(Exception):
    pass


def interrupted(out, cfg, at_epoch: int, monkeypatch):
    """Run until the checkpoint of `at_epoch` is written, then stop as a kill would."""
    save = Searcher.save_checkpoint

    def save_then_stop(self):
        save(self)
        if self.epoch == at_epoch:
            raise Stop

    with monkeypatch.context() as m:
        m.setattr(Searcher, "save_checkpoint", save_then_stop)
        with pytest.raises(Stop):
            Searcher(cfg, out).run()


def test_more_epochs_extend_lr_and_temperature(tmp_path, monkeypatch):
    import shutil

    run, again = tmp_path / "run", tmp_path / "again"
    interrupted(run, tiny(epochs=3), 1, monkeypatch)
    shutil.copytree(run, again)
    before = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    run_search(tiny(epochs=5, resume=True), run)
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4, 5] and recs[:1] == before
    taus, lrs = [r["tau"] for r in recs], [r["lr"] for r in recs]
    assert all(a > b for a, b in zip(taus, taus[1:])), taus  # never re-heated
    assert taus[-1] == pytest.approx(0.5)  # tau_final at the new last epoch
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.0, abs=1e-12), lrs
    # the extended schedule is part of the checkpoint: stopping the extended run and resuming it changes nothing
    interrupted(again, tiny(epochs=5, resume=True), 3, monkeypatch)
    run_search(tiny(epochs=5, resume=True), again)
    assert [json.loads(l)["tau"] for l in (again / "metrics.jsonl").read_text().splitlines()] == taus
    assert [json.loads(l)["lr"] for l in (again / "metrics.jsonl").read_text().splitlines()] == lrs


def test_extending_a_finished_run_keeps_its_final_schedule(tmp_path, finished):
    import shutil

    shutil.copytree(finished, tmp_path / "run")
    stale = tmp_path / "run" / "checkpoints" / ".last.pt.x1y2.tmp"  # a kill during a checkpoint write
    stale.write_bytes(b"half a checkpoint")
    run_search(tiny(epochs=3, resume=True), tmp_path / "run")
    assert not stale.exists()
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert recs[2]["tau"] == pytest.approx(0.5) and recs[2]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_fewer_epochs_than_done_is_refused(finished):
    with pytest.raises(CheckpointError, match="at epoch 2; field 'epochs' \\(1\\) cannot be fewer"):
        Searcher(tiny(epochs=1, resume=True), finished).run()


def test_metrics_torn_and_extra_lines_are_dropped_on_resume(tmp_path, monkeypatch):
    interrupted(tmp_path, tiny(epochs=3), 1, monkeypatch)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "extra": True}) + "\n" + '{"epoch": 3, "tor')  # after the checkpoint; torn
    run_search(tiny(epochs=3, resume=True), tmp_path)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3] and not any("extra" in r for r in recs)


def test_train_resume_refuses_other_settings_and_keeps_metrics_to_the_checkpoint(tmp_path):
    from fbnas import Arch, load_space
    from fbnas.data import load_dataset
    from fbnas.train import TrainSettings, train

    arch = Arch.from_space(load_space("fmnist"), ["ir_k3_e1", "skip", "skip", "skip", "skip", "skip"], 8, 8)
    data = load_dataset("synthetic", synthetic_size=128, input_size=28, in_channels=1, num_classes=10)
    s = TrainSettings(epochs=1, fold_epochs=1, batch_size=32, max_steps_per_epoch=1, calib_batches=1, eval_batch_size=64)
    first = train(arch, data, s, tmp_path)
    for change, named in ((dict(seed=1), "settings.seed=0 (now 1)"), (dict(epochs=2), "settings.epochs=1 (now 2)"),
                          (dict(lr=0.1), "settings.lr=0.05 (now 0.1)")):
        with pytest.raises(CheckpointError, match=named.replace("(", r"\(").replace(")", r"\)")):
            train(arch, data, dataclasses.replace(s, **change), tmp_path, resume=True)
    other = load_dataset("synthetic", synthetic_size=128, input_size=28, in_channels=1, num_classes=10, seed=5)
    with pytest.raises(CheckpointError, match="data.train="):
        train(arch, other, s, tmp_path, resume=True)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"phase": "fol')  # a torn line
    again = train(arch, data, dataclasses.replace(s, accelerator="cpu"), tmp_path, resume=True)
    assert again["acc_integer"] == first["acc_integer"]
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines


def test_atomic_write_failure_leaves_the_old_file_and_no_temp(tmp_path):
    from fbnas.io import atomic_path, atomic_write_text

    atomic_write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "a.json").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_non_finite_loss_stops_the_search_naming_the_step_and_writes_no_result(tmp_path):
    cfg = tiny(epochs=1, optim=dataclasses.replace(SearchConfig().optim, w_lr=1e30, grad_clip=0.0))
    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf) at epoch 0 step \d.*no checkpoint was written"):
        run_search(cfg, tmp_path)
    assert not (tmp_path / "arch.json").exists() and not (tmp_path / "checkpoints" / "last.pt").exists()


def test_the_hessian_term_runs_in_a_search_and_its_state_resumes(tmp_path):
    from fbnas.config import HessianConfig, ObjectiveConfig
    from fbnas.loss_terms import TERMS, HessianTerm, build_terms

    assert all(cls.from_config(ObjectiveConfig()) is None for cls in TERMS.values())  # every term is off by default
    objective = ObjectiveConfig(hessian=HessianConfig(gamma=0.5, max_probes=4, batches=1, refresh_every=2))
    assert [type(t) for t in build_terms(objective)] == [HessianTerm]
    run_search(tiny(epochs=1, objective=objective), tmp_path)
    import torch

    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["terms"]["hessian"]
    assert state["n_refreshes"] >= 1 and state["traces"] is not None  # refreshed when the architecture phase starts
    searcher = Searcher(tiny(epochs=2, objective=objective, resume=True), tmp_path)
    searcher.load_checkpoint()
    assert searcher.terms[0].penalty.n_refreshes == state["n_refreshes"]


@pytest.mark.parametrize("mode, extra", [(m, {}) for m in MODES] + [("two_path", {"anchor_steps": 3})],
                         ids=list(MODES) + ["two_path_anchored"])
def test_every_mode_is_deterministic_and_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, mode, extra):
    cfg = tiny(mode=mode, epochs=3, warmup_epochs=1, **extra)
    whole, again, cut = tmp_path / "whole", tmp_path / "again", tmp_path / "cut"
    run_search(cfg, whole)
    run_search(cfg, again)
    interrupted(cut, cfg, 2, monkeypatch)
    run_search(dataclasses.replace(cfg, resume=True), cut)
    layers = [json.loads((d / "arch.json").read_text())["layers"] for d in (whole, again, cut)]
    assert layers[0] == layers[1] == layers[2]
    logs = [[json.loads(l)["op_probs"] for l in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole, cut)]
    assert logs[0] == logs[1]


@pytest.mark.parametrize("extra", [dict(mode="soft", anchor_steps=2), dict(mode="two_path", anchor_steps=0)])
def test_anchor_steps_outside_two_path_or_below_one_is_a_config_error(tmp_path, extra):
    with pytest.raises(ConfigError, match="field 'anchor_steps'"):
        Searcher(tiny(**extra), tmp_path)

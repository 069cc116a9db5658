"""`fbnas pareto`: networks it generates (random at a budget, hand-designed, uniform bits), records it writes,
resume (finished trainings are skipped), and one-line errors for bad input. Tiny synthetic trainings."""
import json
import shutil
import statistics

import pytest
import torch

from fbnas import Arch, build_model, load_space
from fbnas.arch import arch_from_dict
from fbnas.cli import main
from fbnas.errors import ConfigError
from fbnas.latency import arch_latency, get_table
from fbnas.pareto import handcrafted_networks, mbv2_reference_ms, random_networks
from fbnas.pareto import jobs as pareto_jobs
from fbnas.pareto.networks import find_arch_files, search_networks, search_variant, uniform_bit_networks

SPACE = load_space("fmnist")
TABLE = get_table(SPACE, "sd835")
CHEAP = (["skip", "ir_k3_e1", "skip", "ir_k3_e1", "skip", "skip"], [8, 4, 8, 4, 8, 8], [8, 8, 8, 8, 8, 4])
TINY = ["data.name=synthetic", "data.train_subset=128", "data.test_subset=64", "train.epochs=1",
        "train.fold_epochs=1", "train.max_steps_per_epoch=1", "train.batch_size=32", "train.calib_batches=1",
        "train.eval_batch_size=64", "train.act_clip=max", "workers=0", "progress=false", "seeds=[0,1]"]


def write_run(run_dir, ops, w_bits, a_bits, limit_ms, mode="soft"):
    arch = Arch.from_space(SPACE, ops, w_bits, a_bits)
    d = arch.to_dict()
    d["provenance"] = {"device": "sd835", "config": {"mode": mode,
                                                     "objective": {"kind": "target", "limit_ms": limit_ms}}}
    run_dir.mkdir(parents=True)
    (run_dir / "arch.json").write_text(json.dumps(d))
    (run_dir / "metrics.jsonl").write_text("")
    return arch


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("pareto")
    arch = write_run(root / "sweep" / "0", *CHEAP, limit_ms=0.4)
    out = root / "out"
    args = ["pareto", f"runs=[{root / 'sweep'}]", "baselines=[random:1]", *TINY, f"hydra.run.dir={out}"]
    assert main(args) == 0
    return args, out, arch


def test_records_fields_and_values(study):
    _, out, arch = study
    recs = json.loads((out / "pareto.json").read_text())
    assert [r["family"] for r in recs] == ["search", "random"]
    for r in recs:
        assert r["device"] == "sd835" and r["seeds"] == [0, 1] and r["budget_ms"] == 0.4
        assert r["acc_integer_mean"] == round(statistics.fmean(r["acc_integer"]), 4)
        assert r["acc_integer_std"] == round(statistics.stdev(r["acc_integer"]), 4)
        a = arch_from_dict(json.loads((out / r["arch"]).read_text()))  # relative paths: out_dir/archs/
        assert r["latency_ms"] == round(arch_latency(TABLE, a), 6)
        assert r["macs"] == a.macs() and r["params"] == a.params() and r["ops"] == [l.op for l in a.layers]
    s, rnd = recs
    assert s["name"] == "search_0.4ms" and s["ops"] == CHEAP[0] and s["bits"] == "8/8 4/8 8/8 4/8 8/8 8/4"
    assert abs(rnd["latency_ms"] / 0.4 - 1) <= 0.05
    md = (out / "pareto.md").read_text()
    assert "fbnas pareto runs=" in md and "| search | search_0.4ms |" in md and "90th percentile" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "hardware:" in (out / "command.txt").read_text()


def _accuracies(out):
    return [(r["name"], r["acc_integer"]) for r in json.loads((out / "pareto.json").read_text())]


def test_rerun_skips_finished_trainings_and_retrains_only_what_is_missing(study, monkeypatch):
    args, out, _ = study
    before = _accuracies(out)
    calls = []
    real = pareto_jobs.run_job
    monkeypatch.setattr(pareto_jobs, "run_job", lambda job, *a: calls.append(job.key) or real(job, *a))
    assert main(args) == 0
    assert calls == []
    assert _accuracies(out) == before
    gone = sorted((out / "results").glob("*.json"))[0]
    gone.unlink()
    arch_id, seed = gone.stem.split("__")
    shutil.rmtree(out / "train" / arch_id / seed)
    assert main(args) == 0
    assert calls == [gone.stem]
    assert _accuracies(out) == before  # trained again from scratch: the same result (CPU training is deterministic)


def test_other_recipe_in_the_same_directory_is_refused(study, capsys):
    args, out, _ = study
    capsys.readouterr()
    assert main([a.replace("train.batch_size=32", "train.batch_size=16") for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.batch_size" in err and "another recipe" in err


def test_random_nets_within_five_percent_of_the_budget_distinct_and_seeded():
    budget = 0.5 * mbv2_reference_ms(SPACE, TABLE)
    nets = random_networks(SPACE, TABLE, 12, budget, "0.50x", seed=0, index=0)
    lats = [arch_latency(TABLE, n.arch) for n in nets]
    assert len(nets) == 12 and all(abs(l / budget - 1) <= 0.05 for l in lats)
    assert len({n.arch_id for n in nets}) == 12
    for n in nets:
        assert all(l.op in SPACE.candidates and l.w_bits in SPACE.w_bits and l.a_bits in SPACE.a_bits
                   for l in n.arch.layers)
    again = random_networks(SPACE, TABLE, 12, budget, "0.50x", seed=0, index=0)
    assert [n.arch_id for n in again] == [n.arch_id for n in nets]
    assert [n.arch_id for n in random_networks(SPACE, TABLE, 12, budget, "0.50x", seed=1, index=0)] != \
        [n.arch_id for n in nets]


def test_unreachable_budget_is_one_line_error_naming_it():
    with pytest.raises(ConfigError, match=r"budget 0\.001 ms \(tiny\).*span"):
        random_networks(SPACE, TABLE, 2, 0.001, "tiny", seed=0, index=0, max_tries=5000)


def test_handcrafted_members_are_valid_in_the_space():
    nets = handcrafted_networks(SPACE)
    assert [n.name for n in nets] == ["mbv2_W8A8", "mbv2_W4A8", "shufflenetv2_W8A8", "shufflenetv2_W4A8",
                                      "squeezenext_W8A8", "squeezenext_W4A8"]
    for n in nets:
        assert arch_from_dict(n.arch.to_dict()) == n.arch  # validates ops against shapes
        assert len({l.op for l in n.arch.layers}) == 1 and n.arch.layers[0].op in SPACE.candidates
        assert build_model(n.arch)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert mbv2_reference_ms(SPACE, TABLE) == arch_latency(TABLE, nets[0].arch)
    no_w4 = load_space("fmnist").__class__(**{**SPACE.__dict__, "w_bits": (8,), "candidates": ("ir_k3_e6", "skip")})
    assert [n.name for n in handcrafted_networks(no_w4)] == ["mbv2_W8A8"]


def test_found_nets_at_uniform_bits(tmp_path):
    write_run(tmp_path / "a", *CHEAP, limit_ms=0.4)
    write_run(tmp_path / "b", CHEAP[0], 8, 8, limit_ms=0.3)
    found = search_networks([str(tmp_path)], SPACE, {0.4: "0.4ms"})
    assert [n.name for n in found] == ["search_0.4ms", "search_0.3ms"]
    uni = uniform_bit_networks(found, SPACE)
    assert [n.name for n in uni] == ["search_0.4ms_W8A8", "search_0.4ms_W4A8", "search_0.3ms_W4A8"]
    assert all(n.arch.layers[i].op == CHEAP[0][i] for n in uni for i in range(6))
    assert {(l.w_bits, l.a_bits) for l in uni[1].arch.layers} == {(4, 8)}


def test_single_path_searches_are_named_by_mode_with_their_search_time(tmp_path):
    write_run(tmp_path / "soft", *CHEAP, limit_ms=0.4)
    write_run(tmp_path / "hard", *CHEAP, limit_ms=0.4, mode="hard")
    (tmp_path / "hard" / "metrics.jsonl").write_text('{"seconds": 1.5}\n{"seconds": 2.25}\n{"seconds": 9')
    found = search_networks([str(tmp_path / "soft"), str(tmp_path / "hard")], SPACE, {0.4: "0.4x"})
    assert [(n.name, n.extra["search_mode"], n.extra["search_seconds"]) for n in found] == [
        ("search_0.4x", "soft", None), ("search_hard_0.4x", "hard", 3.8)]


@pytest.mark.parametrize("case", ["empty_dir", "run_without_arch", "unreachable_budget", "bad_baseline"])
def test_bad_input_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    extra, expect = [], ""
    if case == "empty_dir":
        expect = "holds no search runs"
    elif case == "run_without_arch":
        write_run(runs / "0", *CHEAP, limit_ms=0.4)
        (runs / "1").mkdir()
        (runs / "1" / "metrics.jsonl").write_text("")
        expect = "1 has no arch.json"
    elif case == "unreachable_budget":
        write_run(runs / "0", *CHEAP, limit_ms=0.4)
        extra, expect = ["baselines=[random:2]", "budgets=[0.01]", "budget_unit=mbv2"], "budget"
    else:
        write_run(runs / "0", *CHEAP, limit_ms=0.4)
        extra, expect = ["baselines=[random]"], "random:N"
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["pareto", f"runs=[{runs}]", *TINY, *extra, f"hydra.run.dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expect in err and err.startswith("fbnas: error:")
    assert not out.exists()


def test_find_arch_files_accepts_files_runs_and_multiruns(tmp_path):
    write_run(tmp_path / "m" / "0", *CHEAP, limit_ms=0.4)
    write_run(tmp_path / "m" / "1", *CHEAP, limit_ms=0.3)
    got = find_arch_files([str(tmp_path / "m"), str(tmp_path / "m" / "1"), str(tmp_path / "m" / "0" / "arch.json")])
    assert got == [tmp_path / "m" / "0" / "arch.json", tmp_path / "m" / "1" / "arch.json"]


def test_worker_processes_give_the_results_of_in_process_training(study, tmp_path):
    args, out, _ = study
    par = [a for a in args if not a.startswith(("hydra.run.dir=", "workers=", "baselines="))]
    assert main([*par, "baselines=[]", "workers=2", f"hydra.run.dir={tmp_path}"]) == 0
    assert len(list((tmp_path / "results").glob("*.json"))) == 2
    assert _accuracies(tmp_path) == _accuracies(out)[:1]


def test_a_crash_keeps_finished_trainings_and_the_rerun_does_only_the_rest(study, tmp_path, monkeypatch):
    args, _, _ = study
    par = [a for a in args if not a.startswith(("hydra.run.dir=", "baselines="))]
    calls = []
    real = pareto_jobs.run_job

    def crash_on_second(job, *a):
        calls.append(job.key)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(job, *a)

    monkeypatch.setattr(pareto_jobs, "run_job", crash_on_second)
    assert main([*par, "baselines=[]", f"hydra.run.dir={tmp_path}"]) != 0
    assert len(list((tmp_path / "results").glob("*.json"))) == 1 and not (tmp_path / "pareto.json").exists()
    assert main([*par, "baselines=[]", f"hydra.run.dir={tmp_path}"]) == 0
    assert calls == [calls[0], calls[1], calls[1]]


@pytest.mark.parametrize("config, name", [
    ({}, "soft"),
    ({"mode": "hard", "seed": 0}, "hard"),
    ({"mode": "two_path"}, "two_path"),  # a run from before anchors
    ({"mode": "two_path", "anchor_steps": None}, "two_path"),
    ({"mode": "two_path", "anchor_steps": 25, "seed": 1}, "two_path_a25_s1"),
    ({"mode": "soft", "anchor_steps": None, "seed": 2}, "soft_s2"),
])
def test_search_variants_name_the_mode_anchors_and_search_seed(config, name):
    assert search_variant(config) == name

"""`fbnas report`: per-epoch op/bit probabilities in metrics.jsonl, report.md and the plots of a search run."""
import json

import pytest
from omegaconf import OmegaConf
from PIL import Image

from fbnas.cli import main as cli
from fbnas.config import SearchConfig
from fbnas.report import SweepReport, write_report
from fbnas.search import run_search
from fbnas.space import load_space


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    cfg = SearchConfig(epochs=3, warmup_epochs=1, max_steps_per_epoch=3, progress=False)
    cfg.data.name, cfg.data.synthetic_size, cfg.data.batch_size = "synthetic", 256, 32
    cfg.derive.eval_batches = cfg.derive.calibration_batches = 1
    return out, run_search(cfg, out)


def test_metrics_hold_probabilities_per_layer(run):
    out, _ = run
    from fbnas.latency import load_device

    space = load_device("sd835").search_space(load_space("fmnist"))  # the bit choices the search offers: W8A8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert len(r["op_probs"]) == space.num_layers and len(r["op_probs"][0]) == len(space.candidates)
        assert len(r["w_bit_probs"][0]) == len(space.w_bits) and len(r["a_bit_probs"][0]) == len(space.a_bits)
        for key in ("op_probs", "w_bit_probs", "a_bit_probs"):
            assert all(sum(row) == pytest.approx(1.0, abs=1e-3) for row in r[key])
    assert records[0]["op_probs"][0] == pytest.approx([1 / len(space.candidates)] * len(space.candidates))  # warm-up
    assert records[-1]["op_probs"] != records[0]["op_probs"]  # the architecture steps moved them


def test_report_writes_markdown_and_plots(run, tmp_path):
    out, result = run
    paths = write_report(out, tmp_path)
    assert [p.name for p in paths] == ["report.md", "search_curves.png", "search_ops.png", "search_bits.png"]
    for p in paths[1:]:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.size[0] > 600 and img.size[1] > 300
    text = paths[0].read_text()
    assert text.count("\n| 1 (warm-up) |") == 1 and "\n| 3 |" in text
    for i, layer in enumerate(result.arch.layers):
        assert f"| layers.{i} | {layer.op} |" in text
    assert f"**{result.latency_ms:.4g}**" in text  # per-layer latencies sum to the search's prediction


def test_report_command_and_bad_run(run, tmp_path, capsys):
    out, _ = run
    assert cli(["report", f"run={out}", f"out={tmp_path}"]) == 0
    assert (tmp_path / "search_ops.png").is_file() and "wrote" in capsys.readouterr().out
    assert cli(["report", f"run={tmp_path / 'nope'}"]) == 2
    assert capsys.readouterr().err.strip() == f"fbnas: error: {tmp_path / 'nope'}: run directory not found (field 'run')"


def test_sweep_report_one_row_per_job(run, tmp_path, capsys):
    import shutil

    out, result = run
    for job, beta in (("0", "0.0"), ("1", "0.6"), ("10", "1.5")):
        shutil.copytree(out, tmp_path / job)
        (tmp_path / job / ".hydra").mkdir()
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- epochs=3\n- objective.beta={beta}\n")
    (tmp_path / "multirun.yaml").write_text("{}\n")
    SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))  # after `-m`
    assert (tmp_path / "sweep.md").is_file()
    assert cli(["report", f"sweep={tmp_path}"]) == 0
    text = (tmp_path / "sweep.md").read_text()
    rows = [l for l in text.splitlines() if l.startswith("| ") and "objective.beta" in l]
    assert [r.split(" | ")[:2] for r in rows] == [["| 0", "objective.beta=0.0"], ["| 1", "objective.beta=0.6"],
                                                   ["| 10", "objective.beta=1.5"]]  # job order; swept values only
    assert all(f"{result.latency_ms:.6g}"[:5] in r for r in rows) and (tmp_path / "sweep.png").is_file()
    assert cli(["report", f"run={out}", f"sweep={tmp_path}"]) == 2
    assert "one of run=" in capsys.readouterr().err

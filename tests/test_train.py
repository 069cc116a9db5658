"""QAT trainer end to end on a tiny synthetic task, resume, and one-line errors for bad weights files."""
import json

import pytest
import torch

from fbnas import Arch, load_space
from fbnas.data import load_dataset
from fbnas.errors import CheckpointError
from fbnas.quant.artifacts import load_folded
from fbnas.train import TrainSettings, train



OPS = ["skip", "ir_k3_e1", "shuffle_k3", "sqnxt_k3", "ir_k3_e1", "ir_k3_e1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    arch = Arch.from_space(load_space("fmnist"), OPS, [8, 4, 2, 8, 4, 8], [8, 4, 4, 8, 4, 8])
    data = load_dataset("synthetic", synthetic_size=256, input_size=28, in_channels=1, num_classes=10)
    s = TrainSettings(epochs=1, fold_epochs=2, batch_size=32, max_steps_per_epoch=2, calib_batches=2, eval_batch_size=64)
    metrics = train(arch, data, s, out)
    return out, arch, data, s, metrics


def test_train_writes_outputs_and_integer_agrees(run):
    out, arch, _, _, m = run
    for f in ("model.safetensors", "model_bn.safetensors", "integer.safetensors", "quant_params.json",
              "metrics.json", "metrics.jsonl", "arch.json", "checkpoints/last.pt"):
        assert (out / f).is_file(), f
    assert m["acc_integer"] == m["acc_fake_quant"]
    assert m["integer_vs_fake_top1_disagreements"] == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    params = json.loads((out / "quant_params.json").read_text())
    assert params["nodes"]["layers.2.right.0"]["weight_range"][1] <= 1  # 2-bit weights: {-1, 0, 1}


def test_resume_of_finished_run_gives_same_result(run):
    out, arch, data, s, m = run
    again = train(arch, data, s, out, resume=True)
    assert again["acc_integer"] == m["acc_integer"]


def test_existing_run_without_resume_is_refused(run):
    out, arch, data, s, _ = run
    with pytest.raises(CheckpointError, match="resume=true"):
        train(arch, data, s, out)


def test_reload_folded_model_equals_saved(run):
    out, arch, data, _, _ = run
    folded = load_folded(out / "model.safetensors")
    x = data.test.x[:8]
    with torch.no_grad():
        assert folded(x).shape == (8, 10)


def test_weights_that_do_not_match_the_arch(run, tmp_path):
    out, arch, _, _, _ = run
    other = arch.with_bits(8, 8)
    other = Arch.from_space(load_space("fmnist"), ["ir_k3_e3"] * 6, 8, 8)
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_folded(out / "model.safetensors", other, "other.json")


def test_corrupt_safetensors_is_one_line_error(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as exc:
        load_folded(bad)
    assert "\n" not in str(exc.value)


def test_mse_clipping_reaches_every_activation_quantizer_and_bad_mode_is_refused(run):
    from fbnas.errors import ConfigError
    from fbnas.quant.fold import QuantPoint

    out, *_ = run
    folded = load_folded(out / "model.safetensors")
    from fbnas.train import set_act_clipping

    set_act_clipping(folded, "mse")
    points = [m for m in folded.modules() if isinstance(m, QuantPoint)]
    assert points and all(p.observer.clip_bits == p.bits for p in points)
    set_act_clipping(folded, "max")
    assert all(p.observer.clip_bits is None for p in points)
    with pytest.raises(ConfigError, match="act_clip"):
        TrainSettings(act_clip="percentile").check()


def test_train_command_takes_accelerator_and_refuses_a_missing_gpu_in_one_line(run, tmp_path, capsys):
    from fbnas.cli import main

    _, arch, _, _, _ = run
    arch.save(tmp_path / "arch.json")
    common = [f"arch={tmp_path / 'arch.json'}", "data.name=synthetic", "epochs=1", "fold_epochs=1", "batch_size=32",
              "max_steps_per_epoch=1", "calib_batches=1", "eval_batch_size=64"]
    assert main(["train", *common, "accelerator=cpu", f"hydra.run.dir={tmp_path / 'cpu'}"]) == 0
    assert json.loads((tmp_path / "cpu" / "metrics.json").read_text())["settings"]["accelerator"] == "cpu"
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main(["train", *common, "accelerator=cuda", f"hydra.run.dir={tmp_path / 'gpu'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert "accelerator" in err and "\n" not in err and not (tmp_path / "gpu" / "metrics.json").exists()

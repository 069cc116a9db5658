"""`fbnas hessian`: hessian.json for a child (arch + weights) or a search checkpoint; bad input -> one line, exit 2."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from fbnas import Arch, build_model, load_space
from fbnas.cli import main
from fbnas.errors import ConfigError
from fbnas.hessian.report import load_hessian
from fbnas.search import CHECKPOINT_FORMAT
from fbnas.supernet import Supernet

FAST = ["data.name=synthetic", "batches=1", "batch_size=8", "max_probes=8", "min_probes=4", "method=loop", "threads=1"]


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()  # threads=1 below sets the process-wide count
    yield
    torch.set_num_threads(n)


@pytest.fixture
def child(tmp_path):
    torch.manual_seed(0)
    arch = Arch.from_space(load_space("fmnist"), ["ir_k3_e1", "skip", "skip", "ir_k3_e3", "shuffle_k3", "sqnxt_k3"],
                           4, 8)
    model = build_model(arch)
    arch.save(tmp_path / "arch.json")
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    return tmp_path, model


def test_child_traces_written_as_fbnas_hessian_json(child, capsys):
    d, model = child
    rc = main(["hessian", f"arch={d / 'arch.json'}", f"weights={d / 'model.safetensors'}", f"out_dir={d / 'out'}"]
              + FAST)
    assert rc == 0
    rec = load_hessian(d / "out" / "hessian.json")
    assert (d / "out" / "hessian.png").stat().st_size > 1000
    assert list(rec["groups"]) == ["stem"] + [f"layers.{i}" for i in range(6)] + ["head"]
    l0 = rec["groups"]["layers.0"]
    assert l0["n_params"] == sum(m.weight.numel() for m in model.layers[0].modules() if isinstance(m, torch.nn.Conv2d))
    assert l0["n_probes"] == 8 and set(l0["omega"]) == {"2", "4", "8"}
    assert rec["settings"]["batch_size"] == 8 and rec["source"]["checkpoint"] is None
    assert rec["groups"]["layers.2"]["n_params"] == 0 and rec["groups"]["layers.2"]["omega"]["2"] == 0.0
    out = capsys.readouterr()
    assert "layers.3" in out.out and "probe cap" in out.err


def test_plot_names_bars_by_layer_op_and_bits(child, monkeypatch):
    import matplotlib.axes

    from fbnas.config import HessianRunConfig
    from fbnas.hessian.run import _labels

    d, model = child
    labels = _labels(HessianRunConfig(arch=str(d / "arch.json"), weights="w"), model)
    assert labels["layers.0"] == "0: ir_k3_e1 W4A8" and labels["layers.5"] == "5: sqnxt_k3 W4A8"
    seen = {}
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", lambda self, text, **kw: seen.update(x=text))
    main(["hessian", f"arch={d / 'arch.json'}", f"weights={d / 'model.safetensors'}", f"out_dir={d / 'o'}"] + FAST)
    assert seen["x"] == "layer: op and bits"


def test_supernet_checkpoint_traces_every_op(tmp_path):
    torch.manual_seed(0)
    net = Supernet(load_space("fmnist"))
    (tmp_path / "checkpoints").mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "supernet": net.state_dict(), "space": "fmnist",
                "config": {"mode": "soft", "quantized": True},
                "epoch": 1, "step": 10}, tmp_path / "checkpoints" / "last.pt")
    rc = main(["hessian", f"checkpoint={tmp_path / 'checkpoints' / 'last.pt'}", "plot=false"]
              + [a for a in FAST if not a.startswith("max_probes")] + ["max_probes=4", "min_probes=2", "batch_size=4"])
    assert rc == 0
    rec = json.loads((tmp_path / "hessian.json").read_text())  # the run folder, not checkpoints/
    n_with_weights = sum(1 for layer in net.mixed_layers for op in layer.ops
                         if any(isinstance(m, torch.nn.Conv2d) for m in op.modules()))
    assert len(rec["groups"]) == n_with_weights
    assert "mixed_layers.5.ops.0" in rec["groups"]
    assert all(math.isfinite(g["trace_per_param"]) for g in rec["groups"].values())


def one_line_error(capsys, argv) -> str:
    assert main(["hessian"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line_and_writes_nothing(child, capsys):
    d, model = child
    assert "either checkpoint=" in one_line_error(capsys, FAST)
    assert "weights file not found" in one_line_error(
        capsys, [f"arch={d / 'arch.json'}", f"weights={d / 'nope.safetensors'}"] + FAST)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.classifier.weight"][0, 0] = float("inf")
    save_file(state, str(d / "bad.safetensors"))
    err = one_line_error(capsys, [f"arch={d / 'arch.json'}", f"weights={d / 'bad.safetensors'}"] + FAST)
    assert "loss on batch 0 is" in err
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    save_file(state, str(d / "partial.safetensors"))
    assert "do not match" in one_line_error(capsys, [f"arch={d / 'arch.json'}",
                                                    f"weights={d / 'partial.safetensors'}"] + FAST)
    assert not (d / "hessian.json").exists()


def test_accelerator_that_is_missing_is_a_clear_error(child, capsys):
    d, _ = child
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    err = one_line_error(capsys, [f"arch={d / 'arch.json'}", f"weights={d / 'model.safetensors'}", "accelerator=cuda"]
                         + FAST)
    assert "accelerator" in err and "CUDA is not available" in err


def test_load_hessian_names_the_bad_field(tmp_path):
    p = tmp_path / "hessian.json"
    p.write_text(json.dumps({"format": "fbnas-hessian/1", "groups": {"layers.0": {"trace_per_param": "x"}}}))
    with pytest.raises(ConfigError, match=r"groups\.layers\.0\.trace_per_param"):
        load_hessian(p)

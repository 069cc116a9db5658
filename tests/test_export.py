"""fbnas export: every format from a quantized and an FP32 run directory, outputs that load and agree with the
integer / float model, and one-line errors for a bad run directory or format."""
import json

import numpy as np
import onnx
import pytest
import torch

from fbnas import build_model
from fbnas.errors import ConfigError
from fbnas.io import atomic_write_json
from fbnas.quant.artifacts import save_state
from fbnas.quant.export import export_run
from fbnas.quant.integer import to_integer
from fbnas.quant.onnx_graph import ort_session
from fbnas.train import set_quantization

from test_integer import _folded

MIXED = ([8, 4, 2, 8, 4, 8], [8, 4, 8, 4, 8, 4])


def _quantized_run(path, bits=MIXED):
    _, folded, x = _folded(*bits, seed=2, n=8)
    arch = folded.arch
    arch.save(path / "arch.json")
    save_state(path / "model.safetensors", folded, arch, "folded", {"rounding": "half_even"})
    atomic_write_json(path / "metrics.json", {"acc_fake_quant": 12.5, "acc_integer": 12.5,
                                              "integer_vs_fake_top1_disagreements": 0})
    return folded, x


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    folded, x = _quantized_run(run)
    written = export_run(run, run / "export")
    return run, folded, x, written


def test_quantized_run_exports_every_format_by_default(exported):
    run, folded, x, written = exported
    assert set(written) == {"arch", "safetensors", "pt2", "onnx_fp32", "onnx_qdq", "onnx_qlinear", "card"}
    assert all(p.is_file() and p.parent == run / "export" for p in written.values())
    assert (run / "export" / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    assert json.loads((run / "export" / "arch.json").read_text())["layers"][2]["w_bits"] == 2
    card = written["card"].read_text()
    assert "integer-only: 12.5" in card and "| 2 | shuffle_k3 |" in card and "G BOPs" in card


def test_exported_programs_agree_with_the_integer_model(exported):
    _, folded, x, written = exported
    integer = to_integer(folded)
    with torch.no_grad():
        ref = integer(x)
    program = torch.export.load(str(written["pt2"]))
    assert torch.equal(program.module()(x[:3]), ref[:3])  # dynamic batch, bit-exact
    qdq = onnx.load(written["onnx_qdq"])
    assert qdq.ir_version == 10 and onnx.TensorProto.INT4 in {i.data_type for i in qdq.graph.initializer}
    got = ort_session(qdq).run(None, {"input": x.numpy()})[0]
    assert (got.argmax(1) == ref.numpy().argmax(1)).all()
    qlinear = ort_session(onnx.load(written["onnx_qlinear"])).run(None, {"input": x.numpy()})[0]
    assert (qlinear.argmax(1) == ref.numpy().argmax(1)).all()
    fp32 = ort_session(onnx.load(written["onnx_fp32"])).run(None, {"input": x.numpy()})[0]
    assert fp32.shape == (len(x), 10) and np.isfinite(fp32).all()


def test_fp32_run_exports_float_formats_only(tmp_path):
    net, _, x = _folded(8, 8, seed=3, n=4)
    arch = net.arch
    float_net = build_model(arch, quantized=False).eval()
    float_net.load_state_dict(net.state_dict())
    arch.save(tmp_path / "arch.json")
    save_state(tmp_path / "model.safetensors", float_net, arch, "float")
    atomic_write_json(tmp_path / "metrics.json", {"acc_float": 50.0})
    written = export_run(tmp_path, tmp_path / "out", ["all"])
    assert "onnx_qdq" not in written and written["pt2"].name == "model_fp32.pt2"
    got = ort_session(onnx.load(written["onnx_fp32"])).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = float_net(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()  # BN folded == BN
    with pytest.raises(ConfigError, match="onnx_qdq needs a quantized run"):
        export_run(tmp_path, tmp_path / "out2", ["onnx_qdq"])


def test_bad_run_dir_and_format_are_one_line_errors(tmp_path, capsys):
    from fbnas.cli import main

    assert main(["export", f"run={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fbnas: error:") and "run directory not found" in err and "\n" not in err
    (tmp_path / "arch.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"model\.safetensors is missing"):
        export_run(tmp_path, tmp_path / "out")
    _quantized_run(tmp_path, (8, 8))
    with pytest.raises(ConfigError, match="field 'formats' has 'tflite'"):
        export_run(tmp_path, tmp_path / "out", ["tflite"])
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

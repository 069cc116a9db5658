"""The command line of the deployment tools on a small quantized run: `fbnas quantize ilp` with a LUT-latency
limit, `fbnas quantize onnx mode=qlinear`, `fbnas export` with chosen formats."""
import json

import onnx
import pytest

from fbnas.cli import main
from fbnas.latency import arch_latency, get_table
from fbnas.arch import load_arch

from test_export import _quantized_run



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    _quantized_run(path, (8, 8))
    return path


def test_quantize_ilp_latency_ratio_writes_arch_with_lut_latency(run, capsys):
    out = run / "arch_ilp.json"
    assert main(["quantize", "ilp", f"arch={run / 'arch.json'}", f"run={run}", "latency_ratio=0.7",
                 "device=bitfusion", f"out={out}"]) == 0
    new = load_arch(out)
    table = get_table(new.space, "bitfusion")
    w8 = arch_latency(table, load_arch(run / "arch.json"))
    assert arch_latency(table, new) <= 0.7 * w8 + 1e-9
    assert new.predicted["bitfusion"]["latency_ms"] == pytest.approx(arch_latency(table, new), abs=1e-6)
    assert "latency_ms" in capsys.readouterr().out


def test_quantize_ilp_infeasible_latency_is_one_line(run, capsys):
    assert main(["quantize", "ilp", f"arch={run / 'arch.json'}", f"run={run}", "latency_ms=1e-6",
                 "device=bitfusion", f"out={run / 'never.json'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "infeasible: latency_ms <=" in err and "\n" not in err
    assert not (run / "never.json").exists()


def test_quantize_onnx_qlinear_on_fashion_mnist(run, capsys):
    onnx_path = run / "model_qlinear.onnx"
    assert main(["quantize", "onnx", f"run={run}", "mode=qlinear", "samples=64", f"out={onnx_path}"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and onnx_path.is_file() and "channel-aligned" in out  # the graph `fbnas export` ships
    shipped = onnx.load(str(onnx_path))
    assert any(n.op_type == "Pad" for n in shipped.graph.node)  # fmnist28's stride-1 stem: input padded to 4 channels
    assert main(["quantize", "onnx", f"run={run}", "mode=qlinear", "samples=64", "align=false"]) == 0
    assert "channel-aligned" not in capsys.readouterr().out


def test_quantize_onnx_failed_check_exits_3_not_2(run, capsys, monkeypatch):
    import fbnas.quant.onnx_check as onnx_check

    real = onnx_check.isolated_conv_check

    def two_lsb(*args, **kwargs):  # a kernel 2 LSB off: the per-kernel bound fails whatever the sample
        return {**real(*args, **kwargs), "max_abs_diff": 2}

    monkeypatch.setattr(onnx_check, "isolated_conv_check", two_lsb)
    assert main(["quantize", "onnx", f"run={run}", "mode=qlinear", "samples=16"]) == 3
    assert "FAIL" in capsys.readouterr().out


def test_export_selected_formats(run):
    assert main(["export", f"run={run}", "formats=[arch,onnx_qlinear,card]", f"out={run / 'exp'}"]) == 0
    assert sorted(p.name for p in (run / "exp").iterdir()) == ["arch.json", "model_card.md", "model_qlinear.onnx"]
    assert json.loads((run / "exp" / "arch.json").read_text())["format"] == "fbnas-arch/1"


def test_pt2_export_prints_nothing_but_its_path(run, capfd):
    capfd.readouterr()
    assert main(["export", f"run={run}", "formats=[pt2]", f"out={run / 'pt2'}"]) == 0
    out, err = capfd.readouterr()
    assert out.split() == ["pt2", str(run / "pt2" / "model_integer.pt2")] and err == ""
    assert sorted(p.name for p in (run / "pt2").iterdir()) == ["model_integer.pt2"]

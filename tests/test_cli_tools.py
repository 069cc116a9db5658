"""The command line's own tools: fast start without torch, `fbnas list`, `fbnas info`, `fbnas quantize --help`."""
import subprocess
import sys

import pytest

from fbnas.arch import Arch
from fbnas.cli import main as cli
from fbnas.latency import arch_latency, build_table, get_table
from fbnas.space import available_spaces, load_space


def test_import_and_help_load_no_torch_and_timm_still_finds_fbnas_net():
    code = ("import sys, fbnas; from fbnas.cli import main; assert main(['--help']) == 0; "
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'heavy import'; "
            "assert fbnas.__version__ and callable(fbnas.build_model); import timm; "
            "assert timm.is_model('fbnas_net'); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_list_spaces_devices_ops(capsys):
    assert cli(["list", "spaces"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert [r.split()[0] for r in rows] == available_spaces()
    assert any(r.split()[:4] == ["fmnist", "1x28x28", "10", "6"] for r in rows)
    assert cli(["list", "devices"]) == 0
    out = capsys.readouterr().out
    assert "sd835 " in out and "bitfusion" in out and "analytic_cpu" in out
    assert cli(["list", "ops"]) == 0
    out = capsys.readouterr().out
    assert "ir_k3_e6       mobilenetv2    kernel=3 expansion=6 groups=1" in out and "skip" in out
    assert cli(["list", "things"]) == 2
    assert "spaces | devices | ops" in capsys.readouterr().err


def test_info_rows_and_latencies_match_the_library(tmp_path, capsys):
    space = load_space("fmnist")
    arch = Arch.from_space(space, ["ir_k3_e6", "skip", "sqnxt_k3", "skip", "shuffle_k3", "ir_k5_e3"], 4, 8)
    arch.save(tmp_path / "a.json")
    assert cli(["info", str(tmp_path / "a.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1].split()
    total = next(l for l in lines if l.startswith("total")).split()
    assert int(total[1].replace(",", "")) == arch.macs() and int(total[2].replace(",", "")) == arch.params()
    per_device = dict(zip(header[7:-1], map(float, total[3:])))  # after part op channels s bits MACs params
    assert sorted(per_device) == ["a11", "bitfusion", "sd835", "sd835_4t"]
    for dev, ms in per_device.items():
        assert ms == pytest.approx(arch_latency(get_table(space, dev), arch), abs=1e-4)
    layer3 = next(l for l in lines if l.startswith("layers.2")).split()
    assert layer3[1:5] == ["sqnxt_k3", "24->24", "1", "w4a8"]


def test_info_prices_a_space_without_tables_with_the_device_model(tmp_path, capsys):
    space = load_space("fmnist")
    arch = Arch.from_space(space, ["ir_k3_e1"] * space.num_layers, 8, 8)
    arch = Arch(**{**arch.__dict__, "space": "my_space"})  # no shipped table for this space name
    arch.save(tmp_path / "a.json")
    assert cli(["info", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "sd835          analytic_cpu model" in out
    total = next(l for l in out.splitlines() if l.startswith("total")).split()
    header = next(l for l in out.splitlines() if l.startswith("part")).split()
    expect = arch_latency(build_table(space, "sd835"), Arch.from_space(space, ["ir_k3_e1"] * space.num_layers, 8, 8))
    assert dict(zip(header[7:-1], map(float, total[3:])))["sd835"] == pytest.approx(expect, abs=1e-4)


def test_info_and_quantize_help_and_bad_input(tmp_path, capsys):
    assert cli(["info", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.strip() == f"fbnas: error: {tmp_path / 'missing.json'}: architecture file not found"
    assert cli(["quantize", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(a in out for a in ("convert", "compare", "ilp", "onnx"))

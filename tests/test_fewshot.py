"""Few-shot device calibration: `fbnas lut export-archs` and `fbnas lut calibrate` (fbnas/latency/fewshot.py)."""
from dataclasses import replace

import pytest
import yaml

from fbnas.arch import Arch
from fbnas.latency import load_device
from fbnas.latency.fewshot import arch_ms, random_pool, spanning_archs
from fbnas.space import load_space




def test_spanning_archs_cover_the_latency_range_with_runnable_bits(fmnist):
    dev = load_device("sd835")
    archs = spanning_archs(fmnist, dev, 8, seed=0, pool=400)
    lat = [arch_ms(dev, a) for a in archs]
    pool = [arch_ms(dev, a) for a in random_pool(fmnist, dev, 400, 0)]
    assert lat == sorted(lat) and len(set(lat)) == 8
    assert lat[0] == pytest.approx(min(pool)) and lat[-1] == pytest.approx(max(pool))
    assert {(l.w_bits, l.a_bits) for a in archs for l in a.layers} == {(8, 8)}  # the pairs sd835 runs


def test_export_archs_writes_models_list_and_template(tmp_path, lut_cli):
    import onnx

    code, out, err = lut_cli("export-archs", "space=fmnist", "device=sd835", "n=2", f"out_dir={tmp_path}",
                          "precision=fp32")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("arch_*")) == ["arch_000.json", "arch_000.onnx", "arch_001.json",
                                                                "arch_001.onnx"]
    onnx.checker.check_model(onnx.load(tmp_path / "arch_001.onnx"))
    assert (tmp_path / "measurements.csv").read_text() == "arch,ms\narch_000.json,\narch_001.json,\n"
    (tmp_path / "measurements.csv").write_text("arch,ms\narch_000.json,1.5\n")
    assert lut_cli("export-archs", "space=fmnist", "device=sd835", "n=2", f"out_dir={tmp_path}",
                "precision=fp32")[0] == 0
    assert (tmp_path / "measurements.csv").read_text() == "arch,ms\narch_000.json,1.5\n"  # a filled file is kept


def _timings_from(device, archs, path, scale=1.0):
    lines = ["arch,ms"] + [f"{' '.join(f'{l.op}:w{l.w_bits}a{l.a_bits}' for l in a.layers)},"
                          f"{scale * arch_ms(device, a):.6f}" for a in archs]
    path.write_text("\n".join(lines) + "\n")


def test_calibrate_recovers_a_device_and_writes_a_usable_file(tmp_path, lut_cli, fmnist):
    base = load_device("sd835")
    truth = replace(base, params=replace(base.params, eff_dw=base.params.eff_dw * 2.5, t_op_us=5.0))
    archs = spanning_archs(fmnist, base, 20, seed=1, pool=600)
    csv_path = tmp_path / "m.csv"
    _timings_from(truth, archs, csv_path)
    out = tmp_path / "myphone.yaml"
    code, text, err = lut_cli("calibrate", "space=fmnist", "device=sd835", f"measurements={csv_path}",
                           f"out={out}")
    assert code == 0, err
    assert "leave-one-out" in text and "MACs alone" in text and "t_op_us" in text
    raw = yaml.safe_load(out.read_text())
    assert raw["defaults"] == ["sd835", "_self_"] and raw["name"] == "myphone"
    dev = load_device(out)  # extends the shipped sd835 from outside conf/device
    assert dev.bits == base.bits and dev.params.t_op_us == pytest.approx(5.0, rel=0.2)
    new = [arch_ms(dev, a) for a in random_pool(fmnist, base, 30, seed=9)]
    ref = [arch_ms(truth, a) for a in random_pool(fmnist, base, 30, seed=9)]
    assert new == pytest.approx(ref, rel=0.05)
    table = tmp_path / "t.json"
    assert lut_cli("build", "space=fmnist", f"device={out}", f"out={table}")[0] == 0


@pytest.mark.parametrize("case", ["other_space", "not_a_number", "non_positive", "too_few", "duplicate",
                                  "bad_header", "measured_base"])
def test_calibrate_bad_input_is_one_line_naming_the_line(case, tmp_path, lut_cli, fmnist):
    base = load_device("sd835")
    archs = spanning_archs(fmnist, base, 8, seed=0, pool=200)
    csv_path = tmp_path / "m.csv"
    _timings_from(base, archs, csv_path)
    lines = csv_path.read_text().splitlines()
    device, expect = "sd835", None
    if case == "other_space":
        space = load_space("fmnist_deep")
        Arch.from_space(space, ["skip"] * space.num_layers, 8, 8).save(tmp_path / "deep.json")
        lines[3] = "deep.json,1.0"
        expect = "line 4: deep.json is an architecture of space 'fmnist_deep'"
    elif case == "not_a_number":
        lines[2] = lines[2].rsplit(",", 1)[0] + ",fast"
        expect = "line 3: ms 'fast' is not a number"
    elif case == "non_positive":
        lines[5] = lines[5].rsplit(",", 1)[0] + ",-2"
        expect = "line 6: ms must be a positive number"
    elif case == "too_few":
        lines = lines[:4]
        expect = "3 measurements; the fit has 5 constants and needs at least 6 rows"
    elif case == "duplicate":
        lines.append(lines[2])
        expect = f"line {len(lines)}: the same architecture as line 3"
    elif case == "bad_header":
        lines[0] = "arch,latency"
        expect = "line 1: the header must be exactly 'arch,ms'"
    elif case == "measured_base":
        device, expect = "host_ort", "fits the constants of an analytic model"
    csv_path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "new.yaml"
    code, _, err = lut_cli("calibrate", "space=fmnist", f"device={device}", f"measurements={csv_path}",
                        f"out={out}")
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()

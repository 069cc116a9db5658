"""Latency tools: the `fbnas lut` command, ONNX op export + CSV import, measured backends, calibration."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch

import fbnas

from fbnas.arch import Arch
from fbnas.errors import LatencyTableError
from fbnas.latency import arch_latency, build_table, get_table, load_device, load_table, space_keys
from fbnas.latency.keys import parse_key, space_signatures
from fbnas.latency.measured import exportable, signature_module, time_module
from fbnas.latency.transfer import export_ops, import_csv
from fbnas.space import load_space




# ------------------------------------------------------------------------------------ CLI

def test_cli_build_check_show(tmp_path, lut_cli, fmnist):
    out_file = tmp_path / "t.json"
    code, out, _ = lut_cli("build", "space=fmnist", "device=sd835_4t", f"out={out_file}")
    assert code == 0 and "292 entries" in out
    table = load_table(out_file)
    assert table.threads == 4 and table.device == "sd835_4t" and table.check(fmnist) == []
    code, out, _ = lut_cli("check", "space=fmnist", "device=sd835_4t", f"table={out_file}")
    assert code == 0 and "292/292 keys" in out
    code, out, _ = lut_cli("show", "space=fmnist", "device=bitfusion", "filter=ir_k3_e6|14x14", "limit=3")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 5 and "FLOP/B" in lines[1] and lines[2].startswith("ir_k3_e6")


def test_cli_predict_matches_library(tmp_path, lut_cli, fmnist):
    table = get_table(fmnist, "sd835")
    a = Arch.from_space(fmnist, ["ir_k3_e6"] * fmnist.num_layers, 4, 8)
    a.save(tmp_path / "a.json")
    n = fmnist.num_layers
    lines = tmp_path / "archs.txt"
    lines.write_text(f"# two archs as ops, one as a file\n{' '.join(['0'] * n)}\n"
                     f"{','.join(['ir_k3_e6:w4a8'] * n)}\na.json\n")
    code, out, err = lut_cli("predict", "space=fmnist", "device=sd835", f"archs={lines}")
    assert code == 0, err
    got = [float(x) for x in out.split()]
    expect_first = arch_latency(table, Arch.from_space(fmnist, [fmnist.candidates[0]] * n, 8, 8))
    assert got == pytest.approx([expect_first, arch_latency(table, a), arch_latency(table, a)], abs=1e-4)


def test_cli_bad_input_is_one_line_exit_2(tmp_path, lut_cli):
    code, out, err = lut_cli("check", "device=pixel9")
    assert code == 2 and err.count("\n") == 1 and "unknown device 'pixel9'; known devices:" in err
    bad = tmp_path / "dev.yaml"
    bad.write_text("name: d\ntype: analytic_cpu\nparams: {freq_ghz: -1}\n")
    code, out, err = lut_cli("build", f"device={bad}", f"out={tmp_path / 'x.json'}")
    assert code == 2 and err.count("\n") == 1 and "params.freq_ghz" in err and str(bad) in err
    assert not (tmp_path / "x.json").exists()
    lines = tmp_path / "archs.txt"
    lines.write_text("ir_k3_e6 skip\n")
    code, _, err = lut_cli("predict", f"archs={lines}")
    assert code == 2 and "line 1" in err and err.count("\n") == 1


def test_cli_build_keeps_measured_or_imported_tables(tmp_path, lut_cli, fmnist):
    table = build_table(fmnist, "sd835")
    table.source = "imported"
    path = tmp_path / "t.json"
    table.save(path)
    before = path.read_bytes()
    code, _, err = lut_cli("build", "space=fmnist", "device=sd835", f"out={path}")
    assert code == 2 and "force=true" in err and path.read_bytes() == before


# ------------------------------------------------------------------------------------ export / import

def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "p50", "p10", "p90", "n"])
        w.writerows(rows)


def test_export_ops_writes_runnable_models_and_manifest(tmp_path):
    import dataclasses

    import onnxruntime as ort

    full = load_space("fmnist")
    space = dataclasses.replace(full, stages=full.stages[:2])  # 3 layers: every op kind, fewer shapes
    manifest = json.loads(export_ops(space, tmp_path, int8=False).read_text())
    assert manifest["format"] == "fbnas-ops/1" and manifest["space"] == "fmnist" and manifest["int8_ops"] == []
    shapes = {parse_key(k).shape_key for k in space_keys(space)}
    assert len(manifest["ops"]) + len(manifest["identity_ops_zero_ms"]) == len(shapes)
    covered = {k for o in manifest["ops"] for k in o["keys"]}
    assert len(covered) + len(manifest["identity_ops_zero_ms"]) * 6 == len(space_keys(space))
    op = next(o for o in manifest["ops"] if o["shape_key"].startswith("shuffle_k3"))
    sess = ort.InferenceSession(str(tmp_path / op["file"]), providers=["CPUExecutionProvider"])
    x = torch.randn(*op["input"]["shape"])
    sig = parse_key(op["keys"][0])
    torch.manual_seed(0)
    ref, _ = signature_module(sig)
    (y,) = sess.run(None, {"x": x.numpy()})
    assert y.shape == tuple(ref(x).shape)
    template = (tmp_path / "measurements_fp32.csv").read_text().splitlines()
    assert template[0] == "key,p50,p10,p90,n" and len(template) == len(manifest["ops"]) + 1
    (tmp_path / "measurements_fp32.csv").write_text("mine\n")
    export_ops(space, tmp_path, int8=False)
    assert (tmp_path / "measurements_fp32.csv").read_text() == "mine\n"  # a filled-in file is never overwritten


def test_export_ops_int8_micro_models_price_every_bit_pair(tmp_path):
    """One int8 QDQ micro-model per (op, shape, bits), cut from the exported network at the codes the layer reads
    and writes; a CSV of their timings imports into a table that prices each bit pair separately."""
    import dataclasses

    import numpy as np

    from fbnas.quant.onnx_graph import ort_session

    full = load_space("fmnist")
    space = dataclasses.replace(full, stages=full.stages[:1], candidates=("ir_k3_e6", "shuffle_k3", "skip"),
                                w_bits=(4, 8), a_bits=(8,))
    manifest = json.loads(export_ops(space, tmp_path).read_text())
    keys = {o["key"] for o in manifest["int8_ops"]}
    assert keys == {k for k, s in space_signatures(space).items() if s.kernels() and s.op != "avgpool"
                    and s.op != "linear" and not s.op.startswith("conv_k")}
    for o in manifest["int8_ops"]:
        m = __import__("onnx").load(tmp_path / o["file"])
        assert any(n.op_type == "DequantizeLinear" for n in m.graph.node)
        feeds = {i["name"]: np.ones(i["shape"], dtype=i["dtype"]) for i in o["inputs"]}
        (y,) = ort_session(m).run(None, feeds)
        sig = parse_key(o["key"])
        assert y.shape[1:] == (sig.c_out, sig.h // sig.stride + sig.h % sig.stride, sig.w // sig.stride
                               + sig.w % sig.stride)
    template = (tmp_path / "measurements.csv").read_text().splitlines()
    assert len(template) == len(keys) + 1
    fixed = [k for k, s in space_signatures(space).items() if s.op in ("avgpool", "linear") or
             s.op.startswith("conv_k")]
    rows = [[k, 0.01 * (i + 1)] for i, k in enumerate(sorted(keys) + fixed)]
    _write_csv(tmp_path / "m.csv", [[k, p, p, p, 5] for k, p in rows])
    table = import_csv(tmp_path / "m.csv", space, "myphone")
    w4 = next(k for k in keys if k.endswith("w4a8"))
    assert table.entries[w4].p50 != table.entries[w4.replace("w4a8", "w8a8")].p50


def test_import_by_shape_key_fills_bits_and_identities(tmp_path, fmnist):
    sigs = space_signatures(fmnist)
    shapes = sorted({s.shape_key for s in sigs.values() if s.kernels()})
    rows = [[k, 0.1 + i * 0.01, 0.09 + i * 0.01, 0.12 + i * 0.01, 30] for i, k in enumerate(shapes)]
    _write_csv(tmp_path / "m.csv", rows)
    table = import_csv(tmp_path / "m.csv", fmnist, "myphone")
    assert table.source == "imported" and table.check(fmnist) == []
    i = next(i for i, k in enumerate(shapes) if k.startswith("ir_"))
    first = [k for k, s in sigs.items() if s.shape_key == shapes[i]]
    assert len(first) == 6
    assert all(table.entries[k].p50 == pytest.approx(0.1 + i * 0.01) and table.entries[k].n == 30 for k in first)
    ident = next(k for k, s in sigs.items() if not s.kernels())
    assert table.entries[ident].p50 == 0.0


@pytest.mark.parametrize("rows,match", [
    ([["nope|8x8|8->8|s1|w8a8", 1.0, 1.0, 1.0, 1]], "malformed|not produced"),
    ([["ir_k3_e1|99x99|16->16|s1", 1.0, 1.0, 1.0, 1]], r"1 key\(s\) are not produced by space fmnist"),
    ([["ir_k3_e1|14x14|16->16|s1", 0, 0, 0, 1]], r"line 2: field 'p50' must be a positive latency"),
    ([["ir_k3_e1|14x14|16->16|s1", -2, -2, -2, 1]], r"line 2: field 'p50' must be a positive latency"),
    ([["ir_k3_e1|14x14|16->16|s1", 1.0, 1.0, 1.0, 1]], r"key\(s\) of space fmnist have no measurement.*nothing was written"),
])
def test_import_rejects_bad_csv_with_one_line(tmp_path, fmnist, rows, match):
    _write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(LatencyTableError, match=match) as exc:
        import_csv(tmp_path / "m.csv", fmnist, "myphone")
    assert "\n" not in str(exc.value)


def test_partial_import_never_overwrites_existing_table(tmp_path, lut_cli):
    dev = tmp_path / "myphone.yaml"
    dev.write_text("name: myphone\ntype: imported\ndescription: my phone, timed with onnxruntime\n")
    good = build_table("fmnist", "sd835")
    out = tmp_path / "t.json"
    good.save(out)
    before = out.read_bytes()
    _write_csv(tmp_path / "m.csv", [["ir_k3_e1|14x14|16->16|s1", 1.0, 1.0, 1.0, 1]])
    code, _, err = lut_cli("import", "space=fmnist", f"device={dev}", f"csv={tmp_path / 'm.csv'}", f"out={out}")
    assert code == 2 and "nothing was written" in err and out.read_bytes() == before


# ------------------------------------------------------------------------------------ measured backends

def test_exportable_shuffle_is_exact():
    from fbnas.blocks import build_op

    x = torch.randn(2, 24, 8, 8)
    for op in ("shuffle_k3", "ir_k3_e1_g2"):
        m = build_op(op, 24, 24, 1).eval()
        assert torch.equal(m(x), exportable(m)(x))


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_measured_table_shares_one_timing_across_bits(backend, fmnist):
    import dataclasses

    from fbnas.latency import load_device

    dev = load_device(f"host_{backend}")
    small = dataclasses.replace(fmnist, stages=fmnist.stages[:1])  # 1 layer: a few shapes, fast
    table = build_table(small, dev, warmup=1, repeats=5)
    assert table.source == "measured" and table.check(small) == []
    assert table.backend["name"] == backend and "torch" in table.backend["versions"]
    sigs = space_signatures(small)
    by_shape = {}
    for k, s in sigs.items():
        by_shape.setdefault(s.shape_key, set()).add(table.entries[k].p50)
    assert all(len(v) == 1 for v in by_shape.values())
    for k, s in sigs.items():
        e = table.entries[k]
        assert (e.p50 == 0 and not s.kernels()) or (0 < e.p10 <= e.p50 <= e.p90 and e.n == 5)


def test_time_module_percentiles():
    stats = time_module(torch.nn.Identity(), torch.zeros(1), "torch", 1, 2, 20)
    assert stats.n == 20 and 0 <= stats.p10 <= stats.p50 <= stats.p90 and math.isfinite(stats.p90)


# ------------------------------------------------------------------------------------ calibration

def test_calibration_targets_hold_for_shipped_devices():
    from fbnas.latency import load_device
    from fbnas.latency.calibration import check_model_targets, check_pixel3_ranks

    results = check_model_targets() + check_pixel3_ranks(load_device("sd835"), 1000)
    failed = [(r.name, r.value) for r in results if not r.ok]
    assert not failed
    macs, fp32 = results[-3].value, results[-2].value
    assert fp32 > macs + 0.02


def test_whole_model_data_ships_with_the_package_and_every_network_traces():
    from fbnas.latency.calibration import WHOLE_MODEL_CSV, net_macs, whole_model_measurements
    from fbnas.latency.reference_nets import reference_net_names

    assert WHOLE_MODEL_CSV.is_relative_to(Path(fbnas.__file__).parent)
    rows = whole_model_measurements()
    assert {m.soc for m in rows} == {"Snapdragon 835", "Apple A11"} and all(m.ms > 0 and m.source for m in rows)
    assert {m.model for m in rows} <= set(reference_net_names())
    # traced MACs equal the published counts of these networks (millions)
    published = {"resnet18": 1814, "resnet50": 4089, "mobilenet_v2": 301, "vgg16": 15470, "mobilenet_v1": 569,
                 "shufflenet_v2_x1_0": 146, "efficientnet_b0": 386}
    for net, mmacs in published.items():
        assert net_macs(net) / 1e6 == pytest.approx(mmacs, rel=0.01), net


def test_whole_model_fit_recovers_its_own_constants():
    """Measurements made by a known model are fitted back to that model's constants."""
    from dataclasses import replace

    from fbnas.latency.calibration import FITS, Measurement, fit_device, net_ms
    from fbnas.latency.analytic import AnalyticCPU

    spec = FITS["sd835"]
    spec = replace(spec, fields=("eff_pw", "eff_dw", "t_op_us"), lower=(0.05, 0.02, 1.0), upper=(1.0, 1.0, 100.0))
    truth = replace(load_device("sd835").params, eff_pw=0.6, eff_dw=0.3, t_op_us=20.0)
    nets = ["mobilenet_v1", "mobilenet_v2", "resnet18", "squeezenet1_1", "shufflenet_v2_x1_0"]
    rows = [Measurement("d", spec.soc, 1, spec.reference_framework, n, "fp32", 224,
                        net_ms(AnalyticCPU(truth), n), "synthetic") for n in nets]
    fit = fit_device(spec, rows)
    assert fit.params["eff_pw"] == pytest.approx(0.6, rel=1e-3)
    assert fit.params["eff_dw"] == pytest.approx(0.3, rel=1e-3)
    assert fit.params["t_op_us"] == pytest.approx(20.0, rel=1e-3)


# ------------------------------------------------------------------------------------ measured int8 (onnxruntime)

def test_int8_part_of_node_names():
    from fbnas.latency.measured_int8 import part_of

    assert part_of("layers.3.pw:Conv_token_14") == "layers.3"
    assert part_of("layers.12.add:Add") == "layers.12"
    assert part_of("input.q:QuantizeLinear") == part_of("stem:Conv_token_1") == "stem"
    assert part_of("head.conv:Conv") == "head" and part_of("head.pool:GlobalAveragePool") == "pool"
    assert part_of("head.classifier:Gemm") == "classifier"
    assert part_of("Transpose_token_78") is None and part_of("layersX:Conv") is None


def test_int8_node_parts_cover_onnxruntime_inserted_nodes(tmp_path, fmnist):
    import onnx

    from fbnas.latency.measured_int8 import int8_graph, node_parts
    from fbnas.quant.onnx_graph import ort_session

    arch = Arch.from_space(fmnist, ["ir_k3_e1", "shuffle_k3", "shuffle_k3", "sqnxt_k3", "skip", "ir_k3_e3"], 8, 8)
    opt = tmp_path / "opt.onnx"
    ort_session(int8_graph(arch), optimized_path=str(opt))
    graph = onnx.load(str(opt))
    parts = node_parts(graph)
    assert set(parts) == {n.name for n in graph.graph.node}
    assert set(parts.values()) == {"stem", "layers.0", "layers.1", "layers.2", "layers.3", "layers.5", "head", "pool",
                                   "classifier"}  # layers.4 (skip, identity) runs no node
    inserted = [n.name for n in graph.graph.node if n.op_type == "Transpose" and ":" not in n.name]
    assert inserted and all(parts[n] for n in inserted)


def test_int8_table_by_in_network_differences(fmnist):
    import dataclasses

    from fbnas.latency import load_device

    small = dataclasses.replace(fmnist, stages=fmnist.stages[:1], candidates=("ir_k3_e1", "sqnxt_k3", "skip"),
                                w_bits=(4, 8), a_bits=(8,))
    dev = load_device("host_ort_int8")
    table = build_table(small, dev, warmup=2, repeats=10)
    assert table.source == "measured" and table.check(small) == [] and table.backend["name"] == "ort_int8"
    cal = table.calibration
    assert cal["base_arch"] == ["skip w8a8"] and cal["networks_timed"] == 1 + 5  # base + every other variant
    base = Arch.from_space(small, ["skip"], 8, 8)
    # the base network's parts split its measured wall time
    assert arch_latency(table, base) == pytest.approx(cal["base_wall_ms_p50"], abs=1e-3)
    assert table.entries["skip|14x14|16->16|s1|w8a8"].p50 == 0.0  # identity: no node
    for key, e in table.entries.items():
        assert 0 <= e.p10 <= e.p50 <= e.p90 and math.isfinite(e.p90), key
    assert table.entries["ir_k3_e1|14x14|16->16|s1|w8a8"].p50 > 0

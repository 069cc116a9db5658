"""Latency tables: keys, the fbnas-lut/1 file, lookups, device files, analytic models, the builder."""
import json
import math
from dataclasses import replace

import pytest
import torch

from fbnas.arch import Arch
from fbnas.blocks.kernels import conv
from fbnas.errors import ConfigError, LatencyTableError
from fbnas.latency import (Entry, LatencyTable, arch_keys, arch_latency, build_table, fixed_latency, get_table,
                           latency_matrix, load_device, load_table, op_key, parse_key, space_keys, table_path)
from fbnas.latency.analytic import AnalyticCPU, BitFusion, BitFusionParams, CPUParams, bitfusion_speedup
from fbnas.latency.devices import known_devices
from fbnas.latency.keys import space_fixed_signatures
from fbnas.space import load_space

CPU = CPUParams(freq_ghz=2.0, simd_lanes=4, vector_pipes=1, eff_pw=0.5, eff_dw=0.25, eff_conv=0.4, eff_linear=0.2,
                int8_speedup_pw=1.25, int8_speedup_dw=1.0, int8_speedup_conv=1.2, int8_speedup_linear=1.0,
                group_efficiency=0.5, shuffle_ns_per_elem=1.0, bandwidth_gbs=10.0, t_op_us=10.0,
                thread_efficiency=0.5)


@pytest.fixture(scope="module")
def fmnist():
    return load_space("fmnist")


@pytest.fixture(scope="module")
def fmnist28():
    return load_space("fmnist28")


@pytest.fixture(scope="module")
def sd835_table(fmnist):
    return build_table(fmnist, "sd835")


# ------------------------------------------------------------------------------------ keys

def test_op_key_format_and_parse_round_trip():
    key = op_key("ir_k3_e6", 32, 32, 16, 24, 1, 4, 8)
    assert key == "ir_k3_e6|32x32|16->24|s1|w4a8"
    sig = parse_key(key)
    assert (sig.op, sig.h, sig.w, sig.c_in, sig.c_out, sig.stride, sig.w_bits, sig.a_bits) == \
        ("ir_k3_e6", 32, 32, 16, 24, 1, 4, 8)
    assert sig.key == key


@pytest.mark.parametrize("bad", ["ir_k3_e6|32x32|16->24|s1", "ir_k3_e6|32|16->24|s1|w4a8", "nope|8x8|8->8|s1|w8a8"])
def test_parse_key_rejects_malformed_and_unknown(bad):
    with pytest.raises(LatencyTableError, match="key"):
        parse_key(bad)


def test_space_keys_cover_every_choice_and_fixed_part(fmnist28):
    fmnist = fmnist28
    keys = space_keys(fmnist)
    shapes = {(l.h_in, l.c_in, l.c_out, l.stride) for l in fmnist.layers()}
    per_shape = len(fmnist.candidates) * len(fmnist.w_bits) * len(fmnist.a_bits)
    assert len(keys) == len(shapes) * per_shape + 4
    fixed = [sig.key for _, sig in space_fixed_signatures(fmnist)]
    assert fixed == ["conv_k3|28x28|1->16|s1|w8a8", "conv_k1|4x4|80->256|s1|w8a8",
                     "avgpool|4x4|256->256|s1|w8a8", "linear|1x1|256->10|s1|w8a8"]
    assert set(fixed) <= keys
    # keyed by shape, never by layer index: the two fbnet_cifar100 layers 24->24 at 32x32 share keys
    assert "ir_k5_e3|32x32|24->24|s1|w2a4" in space_keys(load_space("fbnet_cifar100"))


def test_arch_keys_in_network_order(fmnist28):
    fmnist = fmnist28
    arch = Arch.from_space(fmnist, ["ir_k3_e3"] * fmnist.num_layers, 4, 8)
    keys = arch_keys(arch)
    assert len(keys) == fmnist.num_layers + 4
    assert keys[0].startswith("conv_k3|") and keys[-1].startswith("linear|")
    assert keys[1] == "ir_k3_e3|28x28|16->16|s1|w4a8"
    assert set(keys) <= space_keys(fmnist)


# ------------------------------------------------------------------------------------ analytic models

def test_cpu_compute_bound_kernel_matches_hand_computation():
    model = AnalyticCPU(CPU)
    k = conv("pw", 16, 24, 32, 32)  # 393216 MACs
    peak = 2.0e9 * 4 * 1
    compute_s = 393216 / (peak * 0.5 * 1.25)
    bytes_ = (16 * 1024 * 8 + 16 * 24 * 8 + 24 * 1024 * 8) / 8
    assert bytes_ / 10e9 < compute_s
    assert model.kernel_ms(k, 8, 8) == pytest.approx((compute_s + 10e-6) * 1e3, rel=1e-12)
    fp32_s = 393216 / (peak * 0.5)
    assert model.kernel_ms(k, 32, 32) == pytest.approx((fp32_s + 10e-6) * 1e3, rel=1e-12)
    # sub-8-bit saves bytes, not MACs: a compute-bound kernel costs the same at 2/4/8 bits
    assert model.kernel_ms(k, 2, 4) == model.kernel_ms(k, 8, 8)


def test_cpu_memory_bound_kernel_gets_cheaper_with_fewer_bits():
    model = AnalyticCPU(replace(CPU, bandwidth_gbs=0.1))
    k = conv("dw", 64, 64, 32, 32, 3, 1, 64)  # low arithmetic intensity
    b8 = k.bytes(8, 8)
    assert b8 / 0.1e9 > k.macs / (8e9 * 0.25)
    assert model.kernel_ms(k, 8, 8) == pytest.approx((b8 / 0.1e9 + 10e-6) * 1e3)
    assert model.kernel_ms(k, 4, 4) < model.kernel_ms(k, 8, 8)


def test_cpu_threads_scale_below_linear_and_groups_are_penalised():
    k = conv("pw", 256, 256, 14, 14)
    one, four = AnalyticCPU(CPU, 1), AnalyticCPU(CPU, 4)
    speedup = (one.kernel_ms(k, 32, 32) - 0.01) / (four.kernel_ms(k, 32, 32) - 0.01)
    assert speedup == pytest.approx(1 + 3 * 0.5)
    grouped = conv("pw", 256, 256, 14, 14, groups=2)
    assert one.kernel_ms(grouped, 32, 32) == pytest.approx(one.kernel_ms(k, 32, 32))  # half MACs, half efficiency


def test_cpu_winograd_transforms_cost_per_element_of_3x3_stride1_convs_only():
    wino = replace(CPU, eff_conv3x3=2.0, winograd_ns_per_elem=10.0)
    plain, one, four = AnalyticCPU(replace(wino, winograd_ns_per_elem=0.0)), AnalyticCPU(wino), AnalyticCPU(wino, 4)
    k = conv("conv", 16, 64, 32, 32, 3, 1)
    transforms_ms = (16 + 64) * 32 * 32 * 10e-9 * 1e3
    assert one.kernel_ms(k, 32, 32) - plain.kernel_ms(k, 32, 32) == pytest.approx(transforms_ms, rel=1e-9)
    four_plain = AnalyticCPU(replace(wino, winograd_ns_per_elem=0.0), 4)
    assert four.kernel_ms(k, 32, 32) - four_plain.kernel_ms(k, 32, 32) == pytest.approx(transforms_ms / 2.5)
    for other in (conv("conv", 16, 64, 32, 32, 3, 2), conv("conv", 16, 64, 32, 32, 5, 1), conv("pw", 16, 64, 32, 32),
                  conv("dw", 16, 16, 32, 32, 3, 1, 16)):
        assert one.kernel_ms(other, 32, 32) == plain.kernel_ms(other, 32, 32)
    # with few channels the transforms dominate: per MAC, a narrow 3x3 conv costs more than a wide one
    wide = conv("conv", 256, 256, 8, 8, 3, 1)
    assert one.kernel_ms(k, 32, 32) / k.macs > one.kernel_ms(wide, 32, 32) / wide.macs


def test_reference_nets_run_silu_as_an_elementwise_pass():
    from fbnas.latency.reference_nets import reference_kernels

    acts = [k for k in reference_kernels("efficientnet_b0") if k.kind == "act"]
    assert len(acts) == 49 and acts[0].c_in == 32 and acts[0].h_in == 112 and acts[0].macs == 0
    assert not any(k.kind == "act" for k in reference_kernels("mobilenet_v2"))  # ReLU6 fuses into the conv


def test_bitfusion_speedup_rule():
    assert bitfusion_speedup(8, 8) == 1
    assert bitfusion_speedup(4, 8) == 2
    assert bitfusion_speedup(2, 4) == 8
    assert bitfusion_speedup(2, 2) == 16
    assert bitfusion_speedup(1, 1) == 16  # 1-bit runs on 2-bit bricks
    p = BitFusionParams(freq_mhz=500, fusion_units=512, bandwidth_bits_per_cycle=1e9, eff_pw=1.0, eff_dw=0.1,
                        eff_conv=1.0, eff_linear=1.0, stall_fraction=0.0, t_op_cycles=0)
    k = conv("pw", 64, 64, 16, 16)
    ms = BitFusion(p).kernel_ms(k, 8, 8)
    assert ms == pytest.approx(k.macs / 512 / 500e6 * 1e3, rel=1e-6)
    assert BitFusion(p).kernel_ms(k, 2, 2) == pytest.approx(ms / 16, rel=1e-3)


# ------------------------------------------------------------------------------------ devices

def test_shipped_devices_load_and_are_models_not_measurements():
    assert {"a11", "sd835", "sd835_4t", "bitfusion"} <= set(known_devices())
    for name in ("a11", "sd835", "sd835_4t", "bitfusion"):
        dev = load_device(name)
        assert dev.analytic and "-like" in dev.description


def test_device_defaults_list_merges_base():
    base, four = load_device("sd835"), load_device("sd835_4t")
    assert four.threads == 4 and base.threads == 1
    assert four.params == base.params


def test_unknown_device_lists_known():
    with pytest.raises(ConfigError, match=r"unknown device 'pixel9'; known devices: a11, bitfusion"):
        load_device("pixel9")


@pytest.mark.parametrize("edit,field", [(lambda p: p.pop("eff_dw"), "params.eff_dw"),
                                         (lambda p: p.__setitem__("bandwidth_gbs", -3), "params.bandwidth_gbs"),
                                         (lambda p: p.__setitem__("t_op_us", "fast"), "params.t_op_us")])
def test_bad_device_file_names_file_and_field(tmp_path, edit, field):
    import yaml

    raw = yaml.safe_load(open(load_device("sd835").source))
    edit(raw["params"])
    path = tmp_path / "mydev.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as exc:
        load_device(str(path))
    msg = str(exc.value)
    assert str(path) in msg and f"'{field}'" in msg and "\n" not in msg


# ------------------------------------------------------------------------------------ tables

def test_table_round_trip(tmp_path, sd835_table):
    path = tmp_path / "t.json"
    sd835_table.save(path)
    loaded = load_table(path)
    assert loaded.entries == sd835_table.entries
    assert (loaded.device, loaded.source, loaded.space, loaded.threads) == ("sd835", "analytic", "fmnist", 1)
    assert json.loads(path.read_text())["format"] == "fbnas-lut/1"


@pytest.mark.parametrize("edit,field", [
    (lambda d: d.__setitem__("format", "lut/0"), "'format'"),
    (lambda d: d.__setitem__("source", "guessed"), "'source'"),
    (lambda d: next(iter(d["entries"].values())).__setitem__("p50", -1.0), ".p50'"),
    (lambda d: d["entries"].__setitem__("bad key", {"p50": 1.0}), "bad key"),
])
def test_load_validates_and_names_file_and_field(tmp_path, sd835_table, edit, field):
    d = sd835_table.to_dict()
    edit(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(LatencyTableError) as exc:
        load_table(path)
    assert str(path) in str(exc.value) and field in str(exc.value)


def test_missing_keys_error_lists_keys_count_and_fix(fmnist, sd835_table):
    keys = sorted(k for k in sd835_table.entries if k.startswith("ir_"))
    partial = replace(sd835_table, entries={k: v for k, v in sd835_table.entries.items() if k not in keys[:7]})
    assert partial.check(fmnist) == keys[:7]
    with pytest.raises(LatencyTableError) as exc:
        latency_matrix(partial, fmnist)
    msg = str(exc.value)
    assert "7 key(s) missing" in msg and "(and 2 more)" in msg
    assert all(k in msg for k in keys[:5]) and keys[6] not in msg
    assert "fbnas lut build space=fmnist device=sd835" in msg


def test_latency_matrix_matches_lookups_and_arch_latency(fmnist, sd835_table):
    m = latency_matrix(sd835_table, fmnist)
    assert m.shape == (fmnist.num_layers, len(fmnist.candidates), len(fmnist.w_bits), len(fmnist.a_bits))
    assert m.dtype == torch.float32
    skip = fmnist.candidates.index("skip")
    identity = [l.index for l in fmnist.layers() if l.stride == 1 and l.c_in == l.c_out]
    assert bool((m[identity, skip] == 0).all())  # an identity runs no kernel
    others = torch.ones_like(m, dtype=torch.bool)
    others[identity, skip] = False
    assert bool((m[others] > 0).all())
    layer = fmnist.layers()[2]
    i, wi, ai = fmnist.candidates.index("ir_k3_e6"), fmnist.w_bits.index(4), fmnist.a_bits.index(8)
    key = op_key("ir_k3_e6", layer.h_in, layer.w_in, layer.c_in, layer.c_out, layer.stride, 4, 8)
    assert m[2, i, wi, ai].item() == pytest.approx(sd835_table.lookup(key), rel=1e-6)
    ops = [fmnist.candidates[j % len(fmnist.candidates)] for j in range(fmnist.num_layers)]
    arch = Arch.from_space(fmnist, ops, 2, 4)
    picks = sum(m[l, fmnist.candidates.index(op), fmnist.w_bits.index(2), fmnist.a_bits.index(4)].item()
                for l, op in enumerate(ops))
    assert arch_latency(sd835_table, arch) == pytest.approx(fixed_latency(sd835_table, fmnist) + picks, rel=1e-5)


def test_platforms_differ_on_bits(fmnist28):
    fmnist = fmnist28
    cpu, acc = latency_matrix(build_table(fmnist, "sd835"), fmnist), latency_matrix(build_table(fmnist, "bitfusion"), fmnist)
    w2, w8, a4, a8 = fmnist.w_bits.index(2), fmnist.w_bits.index(8), fmnist.a_bits.index(4), fmnist.a_bits.index(8)
    cpu_gain = (cpu[..., w8, a8].sum() / cpu[..., w2, a4].sum()).item()
    acc_gain = (acc[..., w8, a8].sum() / acc[..., w2, a4].sum()).item()
    # a phone CPU runs 2/4-bit as an fp32 fallback (slower than W8A8); a bit-serial accelerator gains
    assert cpu_gain < 1.0 and acc_gain > 2.0


@pytest.mark.parametrize("device", ["sd835", "sd835_4t", "a11"])
def test_phone_tables_never_price_sub_8_bit_below_w8a8(device, fmnist28):
    """The deployed int8 graph runs 2/4-bit pairs no faster than W8A8 (onnxruntime: slower), so neither may the
    table: every op at every layer costs at least its W8A8 time at every other pair."""
    m = latency_matrix(build_table(fmnist28, device), fmnist28)
    w8, a8 = fmnist28.w_bits.index(8), fmnist28.a_bits.index(8)
    assert bool((m >= m[..., w8:w8 + 1, a8:a8 + 1] - 1e-12).all())
    dev = load_device(device)
    assert dev.search_bits(fmnist28.w_bits, fmnist28.a_bits) == ((8,), (8,))
    assert load_device("bitfusion").search_bits((2, 4, 8), (4, 8)) == ((2, 4, 8), (4, 8))


def test_device_bits_field_is_validated(tmp_path):
    from fbnas.errors import ConfigError
    from fbnas.latency.devices import device_from_dict

    base = {"name": "d", "type": "bitfusion", "params": dict(load_device("bitfusion").raw["params"])}
    for bits, field in (({"w8a8": "fast"}, "bits.w8a8"), ({"w9a8": "int8"}, "bits.w9a8"), ("int8", "bits")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            device_from_dict({**base, "bits": bits}, "d.yaml")
    # not a product set: the search samples weight and activation bits independently
    dev = device_from_dict({**base, "bits": {"w8a8": "native", "w4a4": "native", "default": "fp32_fallback"}})
    with pytest.raises(ConfigError, match="product"):
        dev.search_bits((4, 8), (4, 8))
    dev = device_from_dict({**base, "bits": {"default": "fp32_fallback"}})
    with pytest.raises(ConfigError, match="runs none"):
        dev.search_bits((4, 8), (4, 8))


# ------------------------------------------------------------------------------------ builder

@pytest.mark.parametrize("space_name", ["fmnist", "fmnist28"])
@pytest.mark.parametrize("device", ["sd835", "a11", "bitfusion"])
def test_shipped_fmnist_tables_cover_the_space_and_match_the_device_model(space_name, device):
    fmnist = load_space(space_name)
    path = table_path(space_name, device)
    table = get_table(fmnist, device)
    assert table.path == str(path) and table.check(fmnist) == []
    fresh = build_table(fmnist, device)
    assert {k: e.p50 for k, e in table.entries.items()} == pytest.approx({k: e.p50 for k, e in fresh.entries.items()})


def test_get_table_builds_analytic_in_memory_and_rejects_partial_files(tmp_path, fmnist, sd835_table, monkeypatch):
    with pytest.raises(LatencyTableError, match="absent.json: latency table not found"):  # a given path must exist
        get_table(fmnist, "sd835", path=tmp_path / "absent.json")
    monkeypatch.setattr("fbnas.latency.builder.table_path", lambda space, device: tmp_path / "absent.json")
    built = get_table(fmnist, "sd835")  # no shipped table: the analytic one, in memory
    assert built.path is None and built.check(fmnist) == []
    partial = replace(sd835_table, entries=dict(list(sd835_table.entries.items())[:10]))
    partial.save(tmp_path / "partial.json")
    with pytest.raises(LatencyTableError, match=r"key\(s\) missing.*fbnas lut build space=fmnist device=sd835"):
        get_table(fmnist, "sd835", path=tmp_path / "partial.json")
    with pytest.raises(LatencyTableError, match="device"):
        get_table(fmnist, "a11", path=tmp_path / "partial.json")


def test_entry_spread_is_validated():
    assert Entry.exact(1.5).p10 == Entry.exact(1.5).p90 == 1.5
    bad = LatencyTable(device="x", source="measured", entries={"skip|8x8|8->16|s1|w8a8": Entry(1.0, 2.0, 3.0, 5)})
    from fbnas.latency.table import table_from_dict

    with pytest.raises(LatencyTableError, match="p10 <= p50 <= p90"):
        table_from_dict(bad.to_dict(), "mem")
    assert math.isfinite(sum(e.p50 for e in table_from_dict(
        replace(bad, entries={"skip|8x8|8->16|s1|w8a8": Entry(1.0, 0.5, 3.0, 5)}).to_dict(), "mem").entries.values()))

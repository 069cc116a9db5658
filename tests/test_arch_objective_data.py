import json
import math

import pytest
import timm
import torch

from fbnas import Arch, build_model, load_arch, load_space
from fbnas.data import TensorBatches, TensorData, load_dataset, read_idx, split_tensor_data
from fbnas.errors import ConfigError, DataError
from fbnas.config import ObjectiveConfig
from fbnas.objective import PENALTIES, AdditivePenalty, MultiplicativePenalty, TargetPenalty, make_penalty


def _arch():
    s = load_space("fmnist")
    return Arch.from_space(s, ["ir_k3_e3", "skip", "sqnxt_k3", "shuffle_k3", "ir_k3_e1_g2", "ir_k5_e3"],
                           [8, 4, 2, 8, 4, 2], [8, 4, 4, 8, 8, 4])


def test_arch_roundtrip_and_rebuild(tmp_path):
    a = _arch()
    p = tmp_path / "arch.json"
    a.save(p)
    b = load_arch(p)
    assert b == a
    x = torch.randn(2, 1, 28, 28)
    m1, m2 = build_model(a).eval(), build_model(b).eval()
    m2.load_state_dict(m1.state_dict())
    assert torch.equal(m1(x), m2(x))


def test_timm_create_model(tmp_path):
    p = tmp_path / "arch.json"
    _arch().save(p)
    m = timm.create_model("fbnas_net", arch=str(p), num_classes=7)
    assert m(torch.randn(1, 1, 28, 28)).shape == (1, 7)


def test_arch_costs():
    a = _arch()
    assert a.bops() == sum(k.macs * w * ab for _, ks, w, ab in a.parts() for k in ks)
    assert a.with_bits(8, 8).size_kb() > a.size_kb()
    assert a.with_bits(8, 8).bops() > a.bops()


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d["layers"][1].update(op="ir_k9"), r"field 'layers\[1\].op' names unknown op 'ir_k9'"),
    (lambda d: d["layers"][2].update(w_bits=12), r"field 'layers\[2\].w_bits' has bit-width 12"),
    (lambda d: d["layers"][3].update(c_in=99), r"field 'layers\[3\].c_in' is 99"),
    (lambda d: d.update(format="x"), r"field 'format'"),
])
def test_arch_errors_name_field(tmp_path, edit, msg):
    d = _arch().to_dict()
    edit(d)
    p = tmp_path / "a.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=msg):
        load_arch(p)


def test_penalties():
    ce = torch.tensor(2.0)
    m = MultiplicativePenalty(ref_ms=3.0, alpha=0.2, beta=0.6)
    # at the reference latency the factor is alpha * 1^beta
    assert m(ce, torch.tensor(3.0)).item() == pytest.approx(0.4)
    assert m(ce, torch.tensor(1.5)).item() < m(ce, torch.tensor(3.0)).item() < m(ce, torch.tensor(6.0)).item()
    # sub-millisecond tables stay positive and monotone
    m2 = MultiplicativePenalty(ref_ms=0.01)
    assert 0 < m2(ce, torch.tensor(0.005)).item() < m2(ce, torch.tensor(0.01)).item()
    a = AdditivePenalty(ref_ms=2.0, lam=0.5)
    assert a(ce, torch.tensor(4.0)).item() == pytest.approx(2.5)
    t = TargetPenalty(limit_ms=1.0, eta=0.5)
    t.update(2.0)
    assert t.mu == pytest.approx(0.5)
    t.update(0.0)
    t.update(0.0)
    assert t.mu == 0.0  # the multiplier stays >= 0
    with pytest.raises(ConfigError, match="objective.limit_ms"):
        make_penalty("target", 1.0)
    with pytest.raises(ConfigError, match="objective.kind.*multiplicative"):
        make_penalty("fastest", 1.0)


@pytest.mark.parametrize("kind", sorted(PENALTIES))
def test_every_registered_penalty_builds_from_the_config_and_never_rewards_latency(kind):
    pen = make_penalty(kind, 2.0, ObjectiveConfig(kind=kind, limit_ms=1.5))
    assert pen.name == kind and isinstance(pen, PENALTIES[kind])
    pen.update(torch.tensor(3.0))  # e.g. a target multiplier becomes positive
    ce = torch.tensor(1.2)
    lat = torch.tensor([0.5, 1.0, 2.0, 4.0], requires_grad=True)
    losses = torch.stack([pen(ce, l) for l in lat])
    losses.sum().backward()
    assert torch.isfinite(losses).all() and (lat.grad >= 0).all()
    assert (losses[1:] >= losses[:-1] - 1e-6).all()  # more latency never lowers the loss
    pen.load_state_dict(pen.state_dict())


def test_target_multiplier_updates_on_the_device_without_a_host_read():
    t = make_penalty("target", 1.0, limit_ms=2.0, eta=0.5)
    t.update(torch.tensor(4.0))
    assert isinstance(t.mu, torch.Tensor) and float(t.mu) == pytest.approx(0.5)
    t.update(torch.tensor(0.0))
    t.update(torch.tensor(0.0))
    assert float(t.mu) == 0.0 and t.state_dict() == {"mu": 0.0}


def test_target_multiplier_on_the_device_is_updated_in_place_for_a_captured_graph():
    """After to(device) every penalty's loss reads the same multiplier tensor, which update() changes in place
    (a CUDA graph captured with it sees every update)."""
    t = make_penalty("target", 1.0, limit_ms=2.0, eta=0.5)
    t.load_state_dict({"mu": 0.25})
    t.to(torch.device("cpu"))
    mu = t.mu
    ce, lat = torch.tensor(1.0), torch.tensor(4.0)
    assert float(t(ce, lat)) == pytest.approx(1.0 + 0.25 * (4.0 / 2.0 - 1.0))
    t.update(torch.tensor(4.0))
    t.to(torch.device("cpu"))  # idempotent
    assert t.mu is mu and float(mu) == pytest.approx(0.75)
    for kind in PENALTIES:  # every penalty accepts to()
        make_penalty(kind, 1.0, limit_ms=2.0).to(torch.device("cpu"))


def test_fashion_mnist_loads_and_split_is_deterministic():
    b = load_dataset("fashion_mnist", split_arch=0.2, train_subset=5000, seed=3)
    assert (len(b.train), len(b.arch), len(b.test)) == (4000, 1000, 10000)
    assert b.train.x.shape[1:] == (1, 28, 28) and b.num_classes == 10
    assert abs(b.train.x.mean().item()) < 0.1
    b2 = load_dataset("fashion_mnist", split_arch=0.2, train_subset=5000, seed=3)
    assert torch.equal(b.arch.y, b2.arch.y)


def test_missing_dataset_message(tmp_path, monkeypatch):
    monkeypatch.setattr("fbnas.data.FASHION_MNIST_DIRS", ())
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", root=str(tmp_path))


def test_corrupt_idx(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05\x00\x00\x00\x02\x00\x00\x00\x02" + b"\x01" * 7)
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)


def test_batches_seeded_and_augment_keeps_shape():
    data = TensorData(torch.randn(100, 1, 8, 8), torch.arange(100))
    a = [y for _, y in TensorBatches(data, 32, seed=1)]
    b = [y for _, y in TensorBatches(data, 32, seed=1)]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(a) == math.ceil(100 / 32)
    x, _ = next(iter(TensorBatches(data, 16, seed=1, augment=True)))
    assert x.shape == (16, 1, 8, 8)
    tr, ar = split_tensor_data(data, 0.2, 0)
    assert len(tr) == 80 and len(ar) == 20 and not set(tr.y.tolist()) & set(ar.y.tolist())

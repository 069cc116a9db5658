"""Integer-only model: bit-exact agreement with the folded fake-quant model, no float op inside, rounding,
accumulator-overflow refusal, and the folded model's closeness to the unfolded one."""
import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from fbnas import Arch, build_model, load_space
from fbnas.errors import ConfigError
from fbnas.quant.dyadic import dyadic, dyadic_value, requantize, round_shift
from fbnas.quant.fold import fold_model
from fbnas.quant.integer import int_conv2d, int_matmul, to_integer
from folded_vs_integer import compare as _compare, random_bn as _random_bn

# every block family and lowering path: IR with residual, sqnxt with conv shortcut, shuffle split + non-split,
# grouped IR with shuffle, identity skip
OPS = ["ir_k3_e3", "sqnxt_k3", "shuffle_k3", "ir_k3_e1_g2", "skip", "shuffle_k3"]


def _folded(w_bits, a_bits, seed=0, rounding="half_even", n=16):
    torch.manual_seed(seed)
    arch = Arch.from_space(load_space("fmnist28"), OPS, w_bits, a_bits)
    net = build_model(arch).eval()
    _random_bn(net, seed)
    folded = fold_model(net, rounding)
    x = torch.randn(n, 1, 28, 28)
    folded.calibrate([x[: n // 2], x[n // 2:]])
    return net, folded.eval(), x


@pytest.mark.parametrize("bits,rounding", [((8, 8), "half_even"), ((4, 4), "half_away"),
                                           (([8, 4, 2, 8, 4, 8], [8, 4, 8, 4, 8, 4]), "half_even")])
def test_integer_equals_folded_fake_quant(bits, rounding):
    _, folded, x = _folded(*bits, seed=1, rounding=rounding)
    integer = to_integer(folded)
    lf, li, mismatches = _compare(folded, integer, x)
    assert sum(mismatches.values()) == 0, mismatches
    assert torch.equal(lf, li)


def test_no_float_op_between_input_quantizer_and_dequantization():
    _, folded, x = _folded(4, 4)
    integer = to_integer(folded)
    q_in = integer.nodes["input"](x)
    seen = []

    class RecordDtypes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    seen.append((getattr(func, "__name__", str(func)), t.dtype))
            return out

    record = {}
    body = [st for st in integer.steps if st.kind not in ("input", "linear")]
    env = {"input": q_in}
    with RecordDtypes():
        for st in body:
            node = integer.nodes[st.name.replace(".", "/")] if st.name.replace(".", "/") in integer.nodes else None
            if st.kind in ("conv", "pool"):
                env[st.output] = node(env[st.inputs[0]])
            elif st.kind in ("add", "concat"):
                env[st.output] = node([env[i] for i in st.inputs])
            elif st.kind == "split":
                a, b = st.attrs["channels"]
                env[st.output] = env[st.inputs[0]][:, a:b]
            else:
                from fbnas.quant.fold import channel_shuffle
                env[st.output] = channel_shuffle(env[st.inputs[0]], st.attrs["groups"])
            record[st.output] = env[st.output]
        acc = integer.nodes["head/classifier"].accumulate(env[body[-1].output])
    floats = [(f, d) for f, d in seen if d.is_floating_point]
    assert seen and not floats, floats[:5]
    assert acc.dtype in (torch.int32, torch.int64)
    assert all(not v.dtype.is_floating_point for v in record.values())


def test_folded_model_is_close_to_unfolded_at_8_bits():
    net, folded, x = _folded(8, 8)
    net.train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        net(x)  # calibrate the unfolded model's input quantizers
        net.eval()
        a, b = net(x), folded(x)
    rel = float((a - b).norm() / a.norm())
    assert rel < 0.05, rel  # a wrong topology (split, shuffle, residual) gives O(1) errors


def test_folded_training_step_has_gradients():
    _, folded, x = _folded(4, 4)
    folded.train()
    loss = folded(x).logsumexp(1).mean()
    loss.backward()
    grads = [p.grad for p in folded.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_rounding_modes_on_ties():
    p = torch.tensor([5, 3, -3, -5, 7, 6], dtype=torch.int64)  # /2 -> 2.5, 1.5, -1.5, -2.5, 3.5, 3
    assert round_shift(p, torch.tensor(1), "half_even").tolist() == [2, 2, -2, -2, 4, 3]
    assert round_shift(p, torch.tensor(1), "half_away").tolist() == [3, 2, -2, -3, 4, 3]
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-2 ** 30, 2 ** 30, (2000,), generator=g)
    m, c = dyadic(torch.tensor(0.0123456789, dtype=torch.float64))
    exact = torch.round(acc.double() * dyadic_value(m, c))  # float64 exact here: |product| < 2^53
    assert torch.equal(requantize(acc, m, c, "half_even"), exact.long())


def test_dyadic_is_31_bit_and_close():
    M = torch.tensor([1e-9, 3e-4, 0.5, 0.999999999, 1.0, 7.3], dtype=torch.float64)
    m, c = dyadic(M)
    assert bool(((m < 2 ** 31) & (c >= 0) & (c <= 62)).all())
    assert float(((dyadic_value(m, c) - M).abs() / M).max()) < 2 ** -29


def test_integer_kernels_match_float_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 8, 9, 9), generator=g)
    for groups, cig, co in ((1, 8, 16), (2, 4, 6), (8, 1, 8)):
        w = torch.randint(-127, 128, (co, cig, 3, 3), generator=g).to(torch.int8)
        ref = torch.nn.functional.conv2d(x.double(), w.double(), stride=2, padding=1, groups=groups)
        got = int_conv2d(x, w, (2, 2), (1, 1), groups, offset=128)
        assert got.dtype == torch.int32 and torch.equal(got.double(), ref)
    a = torch.randint(-127, 128, (5, 30), generator=g)
    b = torch.randint(-127, 128, (30, 3), generator=g).to(torch.int8)
    assert torch.equal(int_matmul(a, b).long(), a @ b.long())


def test_accumulator_overflow_is_refused_with_layer_name():
    _, folded, _ = _folded(8, 8)
    with torch.no_grad():
        folded.nodes["layers/0/dw"].bias[3] = 1e9  # int32 bias at S_w*S_in cannot hold it
    with pytest.raises(ConfigError, match=r"layers\.0\.dw: the int32 accumulator can overflow"):
        to_integer(folded)


def test_integer_model_moves_with_to_and_keeps_int_buffers():
    _, folded, x = _folded(8, 8, n=8)
    integer = to_integer(folded).to(torch.device("cpu"))
    dtypes = {k: v.dtype for k, v in integer.state_dict().items()}
    assert dtypes["nodes.layers/0/pw.weight"] == torch.int8
    assert dtypes["nodes.layers/0/pw.bias"] == torch.int32
    assert dtypes["nodes.layers/0/pw.m"] == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_integer_model_on_cuda_equals_cpu():
    _, folded, x = _folded(4, 4)
    integer = to_integer(folded)
    with torch.no_grad():
        cpu = integer(x)
        gpu = integer.to("cuda")(x.cuda()).cpu()
    assert torch.equal(cpu, gpu)

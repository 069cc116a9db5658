import pytest
import torch

from fbnas.quant.act import (ActQuantizer, deferred_range_updates, fake_quantize, mse_clip_range,
                             prescale_activations)
from fbnas.quant.bits import BitState, act_levels
from fbnas.quant.act import _mix_backward, _mix_forward
from fbnas.quant.fake import (QConv2d, fake_quant_weight, mixed_weight, prequantize_weights_mixed, quant_error_sq,
                              quantize_weight_int, weight_scale)


def test_weight_quant_per_channel_symmetric():
    w = torch.randn(4, 3, 3, 3)
    for bits in (2, 4, 8):
        q = quantize_weight_int(w, bits)
        qmax = 2 ** (bits - 1) - 1
        assert q.abs().max() <= qmax
        assert torch.all(q.reshape(4, -1).abs().amax(1) == qmax)  # each channel uses its full range
        s = weight_scale(w, bits)
        assert torch.allclose(s.flatten(), w.reshape(4, -1).abs().amax(1) / qmax)
    err = [quant_error_sq(w, b).item() for b in (2, 4, 8)]
    assert err[0] > err[1] > err[2] > 0


def test_weight_ste_gradient_is_identity():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    fake_quant_weight(w, 4).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_quant_error_gradient_points_to_grid():
    w = torch.randn(8, 4, requires_grad=True)
    quant_error_sq(w, 2).backward()
    s = weight_scale(w, 2)
    wq = quantize_weight_int(w, 2) * s
    assert torch.allclose(w.grad, 2 * (w - wq).detach())


def test_act_quant_unsigned_after_relu_and_levels():
    q = ActQuantizer()
    x = torch.rand(1000) * 6
    st = BitState.fixed(8, 4)
    y = q(x, st)
    assert not q.signed
    levels = torch.unique(torch.round(y / q.scale(4)))
    assert levels.min() >= 0 and levels.max() <= 15 and len(levels) == 16
    q2 = ActQuantizer()
    q2(torch.randn(1000), st)
    assert q2.signed


def _act_mse(x, clip, bits, signed):
    lo, hi = act_levels(bits, signed)
    s = clip / hi
    return float((torch.clamp(torch.round(x / s), lo, hi) * s - x).pow(2).mean())


def test_mse_clip_range_beats_min_max_at_4_bits():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(20000)) ** 2  # a heavy right tail, as after a ReLU
    span = x.max()
    c = mse_clip_range(x, span, 4, signed=False)
    assert 0 < float(c) < 0.8 * float(span)
    assert _act_mse(x, c, 4, False) < 0.8 * _act_mse(x, span, 4, False)
    # the chosen clip is the best of the grid (checked by brute force)
    grid = [float(span) * k / 40 for k in range(1, 41)]
    assert _act_mse(x, c, 4, False) <= min(_act_mse(x, g, 4, False) for g in grid) + 1e-12
    xs = torch.randn(20000) ** 3
    cs = mse_clip_range(xs, xs.abs().max(), 4, signed=True)
    assert _act_mse(xs, cs, 4, True) < _act_mse(xs, xs.abs().max(), 4, True)


def test_act_quantizer_tracks_mse_clip_when_bits_known():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4096)) ** 2
    plain, clipped = ActQuantizer(), ActQuantizer()
    clipped.clip_bits = 4
    for q in (plain, clipped):
        q.observe(x)
    assert float(plain.running_max) == float(x.max())
    assert float(clipped.running_max) == float(mse_clip_range(x, x.max(), 4, False))
    assert not clipped.signed and float(clipped.running_min) == 0.0


def test_act_clipped_ste_gradient():
    q = ActQuantizer()
    q.observe(torch.tensor([0.0, 1.0]))
    q.eval()
    x = torch.tensor([-0.5, 0.5, 2.0], requires_grad=True)
    q(x, BitState.fixed(8, 8)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("lo,hi,scale", [(0, 255, 0.0173), (-127, 127, 0.0091), (0, 15, 0.21), (-7, 7, 0.33)])
def test_cpu_fake_quantize_equals_atens_values_and_gradient(lo, hi, scale):
    gen = torch.Generator().manual_seed(lo + hi)
    s = torch.tensor(scale)
    x = torch.randn(32, 8, 6, 6, generator=gen) * 2
    x.view(-1)[:60] = (torch.arange(60) - 30 + 0.5) * s  # exactly half-way between levels: rounded to even
    x.requires_grad_()
    g = torch.randn(x.shape, generator=gen)
    ref = torch.fake_quantize_per_tensor_affine(x, s, torch.tensor(0, dtype=torch.int32), lo, hi)
    out = fake_quantize(x, s, lo, hi)
    assert torch.equal(out, ref)
    assert torch.equal(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_mixed_bits_equal_weighted_sum_and_gradients_to_probs():
    torch.manual_seed(1)
    conv = QConv2d(3, 5, 3, padding=1, bias=False, bit_state=BitState((2, 4, 8), (4, 8)))
    x = torch.randn(2, 3, 6, 6).relu()
    conv.act_quant.observe(x)
    conv.eval()
    pw = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    pa = torch.tensor([0.4, 0.6], requires_grad=True)
    conv.bit_state.w_probs, conv.bit_state.a_probs = pw, pa
    y = conv(x)
    # reference: sum_b p_b Q_b(W), sum_c p_c Q_c(x), one conv
    wmix = sum(p * fake_quant_weight(conv.weight, b) for p, b in zip(pw, (2, 4, 8)))
    xmix = sum(p * conv.act_quant.quantize(x, b) for p, b in zip(pa, (4, 8)))
    ref = torch.nn.functional.conv2d(xmix, wmix, padding=1)
    assert torch.allclose(y, ref, atol=1e-5)
    y.sum().backward()
    assert pw.grad is not None and torch.all(pw.grad != 0) and torch.all(pa.grad != 0)


def test_batched_mixed_weights_equal_each_convs_mixture_with_its_gradients():
    """prequantize_weights_mixed (soft bits of many convs in one batch) gives every conv sum_b p_b Q_b(W) and the
    gradients mixed_weight gives, to the weights and to the probabilities (two convs share one row of them)."""
    torch.manual_seed(0)
    convs = [QConv2d(c_in, c_out, k, groups=g, bias=False, bit_state=BitState((2, 4, 8), (4, 8)))
             for c_in, c_out, k, g in ((3, 5, 3, 1), (5, 5, 3, 5), (5, 7, 1, 1))]
    bit_rows = [1, 0, 1]
    logits = torch.randn(2, 3, requires_grad=True)
    g = [torch.randn(c.weight.shape) for c in convs]

    def grads(batched: bool):
        for c in convs:
            c.weight.grad = None
        logits.grad = None
        probs = logits.softmax(-1)
        if batched:
            prequantize_weights_mixed(convs, bit_rows, probs, (2, 4, 8))
            outs = [c.prequantized for c in convs]
        else:
            outs = []
            for c, r in zip(convs, bit_rows):
                c.bit_state.w_probs = probs[r]
                outs.append(mixed_weight(c.weight, c.bit_state))
        sum((o * gi).sum() for o, gi in zip(outs, g)).backward()
        return [o.detach() for o in outs], [c.weight.grad for c in convs], logits.grad.clone()

    (out_b, gw_b, gp_b), (out_r, gw_r, gp_r) = grads(True), grads(False)
    for a, b in zip(out_b + gw_b, out_r + gw_r):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gp_b, gp_r, rtol=1e-5, atol=1e-6)
    assert torch.all(gp_b != 0)


def test_activation_mixture_matches_its_autograd_reference():
    """_mix_forward / _mix_backward (the fused activation mixture) against autograd through sum_b p_b Q_b(x) with
    ATen's fake quantization: same output, same gradient to x (clipped straight-through) and to p."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5) * 3
    grad = torch.randn_like(x)
    probs = torch.tensor([0.3, 0.7], requires_grad=True)
    scales = torch.tensor([2.0 / 7, 2.0 / 127])
    levels = ((-7, 7), (-127, 127))
    xr = x.clone().requires_grad_(True)
    ref = sum(probs[i] * torch.fake_quantize_per_tensor_affine(xr, float(scales[i]), 0, lo, hi)
              for i, (lo, hi) in enumerate(levels))
    ref.backward(grad)
    out = _mix_forward(x, torch.reciprocal(scales), probs.detach() * scales, levels)
    grad_x, grad_probs = _mix_backward(x, grad, torch.reciprocal(scales), probs.detach(), scales, levels)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_x, xr.grad)
    torch.testing.assert_close(grad_probs, probs.grad, rtol=1e-5, atol=1e-5)
    assert 0 < int((xr.grad == 0).sum()) < x.numel()  # some elements clipped at both options


def test_a_mixture_that_fails_to_compile_runs_eagerly_from_then_on(monkeypatch):
    from fbnas.quant import act

    def broken(*args):
        raise RuntimeError("no working C compiler\nmore")

    warnings = []
    monkeypatch.setattr(act, "_mix_functions", lambda x: (broken, broken))
    monkeypatch.setattr(act, "_COMPILED_MIX", {})
    monkeypatch.setattr(act.log, "warning", lambda msg, *a: warnings.append(msg % a))
    x = torch.rand(2, 3, 4, 4)
    scales = torch.tensor([0.1, 0.01])
    args = (torch.reciprocal(scales), torch.tensor([0.5, 0.5]) * scales, ((0, 15), (0, 255)))
    assert torch.equal(act._call_mix(0, x, *args), _mix_forward(x, *args))
    assert act._COMPILED_MIX["failed"] and len(warnings) == 1 and "no working C compiler" in warnings[0]


def test_hard_bits_compute_only_the_sampled_option():
    conv = QConv2d(3, 4, 1, bias=False, bit_state=BitState((2, 4, 8), (4, 8)))
    x = torch.rand(2, 3, 4, 4)
    conv.act_quant.observe(x)
    conv.eval()
    st = conv.bit_state
    st.w_probs, st.a_probs = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0])
    st.w_index, st.a_index = 1, 0
    y = conv(x)
    ref = torch.nn.functional.conv2d(conv.act_quant.quantize(x, 4), fake_quant_weight(conv.weight, 4))
    assert torch.equal(y, ref)


def test_float_state_is_plain_conv():
    conv = QConv2d(3, 4, 3, padding=1, bit_state=BitState.float())
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))


def test_batched_weight_quantization_equals_per_conv_and_passes_identity_gradients():
    from fbnas.quant.fake import prequantize_weights
    torch.manual_seed(0)
    convs = [QConv2d(8, 16, 3, bit_state=BitState((2, 4, 8), (8,))), QConv2d(16, 16, 3, groups=16),
             QConv2d(16, 4, 1, bit_state=BitState.fixed(4, 8)), QConv2d(4, 4, 1, bit_state=BitState.fixed(1, 8))]
    convs[0].bit_state.w_index, convs[0].bit_state.a_index = 1, 0
    convs[1].bit_state = BitState.fixed(8, 8)
    convs[1].weight.data[3] = 0.0  # an all-zero channel: scale clamped, values 0
    prequantize_weights(convs)
    assert convs[3].prequantized is None  # 1 bit keeps its own path
    for c, bits in zip(convs[:3], (4, 8, 4)):
        assert torch.equal(c.prequantized, fake_quant_weight(c.weight, bits))
    loss = sum((c.prequantized * torch.arange(c.weight.numel()).view_as(c.weight)).sum() for c in convs[:3])
    loss.backward()
    for c in convs[:3]:
        assert torch.equal(c.weight.grad, torch.arange(c.weight.numel()).view_as(c.weight).float())


def test_batched_weight_quantization_under_autocast_casts_once_and_returns_float_gradients():
    from fbnas.quant.fake import prequantize_weights
    torch.manual_seed(0)
    convs = [QConv2d(8, 16, 3, bit_state=BitState.fixed(4, 8)), QConv2d(16, 4, 1, bit_state=BitState.fixed(8, 8))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prequantize_weights(convs)
    for c, bits in zip(convs, (4, 8)):
        assert c.prequantized.dtype == torch.bfloat16
        assert torch.equal(c.prequantized, fake_quant_weight(c.weight, bits).to(torch.bfloat16))
    sum(c.prequantized.float().sum() for c in convs).backward()
    for c in convs:
        assert c.weight.grad.dtype == torch.float32 and torch.equal(c.weight.grad, torch.ones_like(c.weight))


def test_batched_weights_start_aligned():
    from fbnas.quant.fake import prequantize_weights
    convs = [QConv2d(3, 5, 3, bit_state=BitState.fixed(4, 8)), QConv2d(5, 7, 1, bit_state=BitState.fixed(8, 8)),
             QConv2d(7, 7, 3, groups=7, bit_state=BitState.fixed(2, 8))]
    prequantize_weights(convs)
    base = convs[0].prequantized.data_ptr()
    for c, bits in zip(convs, (4, 8, 2)):
        assert (c.prequantized.data_ptr() - base) % (64 * 4) == 0  # 64 float32 elements apart
        assert torch.equal(c.prequantized, fake_quant_weight(c.weight, bits))


def _observed_pair(signed: bool):
    torch.manual_seed(3)
    xs = [torch.randn(64, 8) * (1.0 + i) for i in range(4)]
    xs = xs if signed else [torch.relu(x) for x in xs]
    return xs, ActQuantizer(), ActQuantizer()


@pytest.mark.parametrize("signed", [False, True])
def test_deferred_range_updates_give_the_same_ema(signed):
    xs, now, later = _observed_pair(signed)
    now.observe(xs[0])
    later.observe(xs[0])
    for x in xs[1:]:
        now.observe(x)
        with deferred_range_updates():
            before = later.scale(8).clone()
            later.observe(x)
            assert torch.equal(later.scale(8), before)  # quantizes with the range as of the block's start
        assert torch.equal(later.running_max, now.running_max)
        assert torch.equal(later.running_min, now.running_min)
    assert now.signed == signed
    if signed:
        assert torch.equal(now.running_min, -now.running_max)
        assert float(now.running_max) > 0


def test_prescaled_activation_scale_equals_the_computed_one():
    xs, q, _ = _observed_pair(True)
    conv = QConv2d(4, 4, 1, bit_state=BitState((8,), (4, 8)))
    conv.act_quant = q
    q.observe(xs[0])
    conv.bit_state.a_index = 0
    prescale_activations([conv])
    assert q.prescale is not None and q.prescale[0] == 4
    q.prescale, expected = None, q.scale(4)
    prescale_activations([conv])
    assert torch.equal(q.scale(4), expected)
    q.observe(xs[1])  # the range moved: the precomputed scale is dropped
    assert q.prescale is None and not torch.equal(q.scale(4), expected)


def test_signed_ranges_of_old_files_load_symmetric_with_the_same_scale():
    q = ActQuantizer()
    state = {"running_min": torch.tensor(-3.0), "running_max": torch.tensor(2.0),
             "initialized": torch.tensor(True)}
    q.load_state_dict(state)
    assert q.signed and float(q.running_max) == 3.0 and float(q.running_min) == -3.0
    assert float(q.scale(8)) == pytest.approx(3.0 / 127)


def test_supernet_quantizes_with_the_ranges_from_before_its_forward_and_moves_them_after():
    from fbnas import load_space
    from fbnas.supernet import Supernet

    torch.manual_seed(0)
    net = Supernet(load_space("fmnist"), mode="hard").train()
    x = torch.randn(4, 1, 28, 28)
    net(x)  # first forward: ranges initialised
    before = {id(m.act_quant): m.act_quant.running_max.clone() for m in net.modules() if isinstance(m, QConv2d)}
    used = {}

    def record(m, _):
        st = m.bit_state
        bits = st.a_choices[st.a_index if st.a_index is not None else 0]
        used[id(m.act_quant)] = (m.act_quant, bits, m.act_quant.scale(bits).clone())

    hooks = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, QConv2d)]
    net(x * 3)
    for h in hooks:
        h.remove()
    assert len(used) >= 4
    for q, bits, scale in used.values():
        assert torch.equal(scale, (before[id(q)] / q.top_level(bits)).clamp_min(1e-8))  # the old range
        assert not torch.equal(q.running_max, before[id(q)])  # moved after the forward
        assert q.prescale is None

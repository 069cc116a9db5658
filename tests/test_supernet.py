import pytest
import torch
import torch.nn.functional as F

from fbnas import load_space
from fbnas.latency import arch_latency, fixed_latency, get_table, latency_matrix
from fbnas.step_stats import StepStats
from fbnas.supernet import MODES, PATHS, Supernet, argmax_cost, gumbel_noise, sample_cost


@pytest.fixture(scope="module")
def space():
    return load_space("fmnist")


def _count_calls(net):
    calls = {}
    hooks = []
    for l, layer in enumerate(net.mixed_layers):
        for i, op in enumerate(layer.ops):
            def hook(mod, inp, out, key=(l, i)):
                calls[key] = calls.get(key, 0) + 1
            hooks.append(op.register_forward_hook(hook))
    return calls, hooks


def test_hard_mode_runs_one_candidate_per_layer_and_grads_reach_every_logit(space):
    net = Supernet(space, mode="hard")
    calls, _ = _count_calls(net)
    # bitfusion: every bit choice changes latency (on sd835 some ops' latency is the same for all weight bits,
    # so those logits truly do not affect the loss)
    table = latency_matrix(get_table(space, "bitfusion"), space)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    loss = F.cross_entropy(net(x), y) * sample_cost(net, table)
    loss.backward()
    for l, layer in enumerate(net.mixed_layers):
        ran = [i for i in range(len(layer.ops)) if calls.get((l, i))]
        assert ran == layer.last_indices
    for p in net.arch_parameters():
        assert p.grad is not None and torch.all(p.grad != 0), p.shape


def test_soft_mode_runs_every_candidate(space):
    net = Supernet(space, mode="soft")
    calls, _ = _count_calls(net)
    net(torch.randn(2, 1, 28, 28))
    assert len(calls) == len(net.mixed_layers) * len(space.candidates)


def test_two_path_mode_mixes_the_two_largest_noisy_ops_and_compares_them(space):
    """two_path: per layer the ops of the two largest noisy logits run, mixed by the softmax over those two (the
    other ops' weights are exactly 0); the cost is the expectation under those weights; only the two ops' logits
    get a gradient, equal and opposite (the softmax over two)."""
    net = Supernet(space, mode="two_path")
    calls, _ = _count_calls(net)
    table = latency_matrix(get_table(space, "bitfusion"), space)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with torch.no_grad():
        for layer in net.mixed_layers:
            layer.op_logits.copy_(torch.randn(len(space.candidates)))
    loss = F.cross_entropy(net(x), y) + sample_cost(net, table)
    loss.backward()
    ops, ws, as_ = net.sample_weights()
    for l, layer in enumerate(net.mixed_layers):
        ran = sorted(i for i in range(len(layer.ops)) if calls.get((l, i)))
        assert ran == sorted(layer.last_indices) and len(ran) == 2
        assert torch.isclose(ops[l, ran].sum(), torch.tensor(1.0)) and ops[l].count_nonzero() == 2
        g = layer.op_logits.grad
        assert g.count_nonzero() == 2 and torch.isclose(g[ran[0]], -g[ran[1]], atol=1e-7)
    assert torch.isclose(sample_cost(net, table), torch.einsum("li,lib,lic,libc->", ops, ws, as_, table))


def _op_indices(net, x, forwards):
    out = []
    for _ in range(forwards):
        with torch.no_grad():
            net(x)
        out.append([list(layer.last_indices) for layer in net.mixed_layers])
    return out


def test_two_path_anchors_hold_the_first_op_for_anchor_steps_forwards_and_resume_exactly(space):
    """anchor_steps=K: each layer's first op (the largest noisy logit when drawn) runs for K forwards, then is
    drawn again; the second op is drawn every forward among the others; the sampler state restores both."""
    net = Supernet(space, mode="two_path", anchor_steps=3)
    x = torch.randn(2, 1, 28, 28)
    seen = _op_indices(net, x, 7)
    for f in range(7):
        for l in range(len(net.mixed_layers)):
            first, second = seen[f][l]
            assert first != second
            assert first == seen[f - f % 3][l][0]  # held from the forward that drew it (0, 3, 6)
    anchors = lambda f: [pair[0] for pair in seen[f]]
    assert anchors(0) != anchors(3) or anchors(3) != anchors(6)  # re-drawn
    assert len({tuple(pair[1] for pair in seen[f]) for f in range(3)}) > 1  # the challengers change each forward
    net.seed(5)
    _op_indices(net, x, 4)  # stop mid-period
    state, rng = net.sampler_state(), net.generator.get_state()
    after = _op_indices(net, x, 5)
    net.load_sampler_state(state)
    net.generator.set_state(rng)
    assert _op_indices(net, x, 5) == after


def test_two_path_with_one_anchor_step_is_the_gumbel_top_two(space):
    plain, anchored = Supernet(space, mode="two_path"), Supernet(space, mode="two_path", anchor_steps=1)
    x = torch.randn(2, 1, 28, 28)
    assert _op_indices(plain, x, 3) == _op_indices(anchored, x, 3)
    with pytest.raises(ValueError, match="anchor_steps"):
        Supernet(space, mode="soft", anchor_steps=2)


def test_a_sampler_state_of_older_checkpoints_loads(space):
    net = Supernet(space, mode="two_path")
    x = torch.randn(2, 1, 28, 28)
    _op_indices(net, x, 2)
    state = net.sampler_state()
    net.load_sampler_state(state["logits"])  # before anchors, the state was the lagged logits alone
    assert torch.equal(net.sampler_state()["logits"], state["logits"])


def test_identity_skip_has_no_bit_logits(space):
    net = Supernet(space)
    layer = net.mixed_layers[0]  # 16 -> 16 stride 1: skip is identity
    skip = space.candidates.index("skip")
    assert skip not in layer.bit_ops
    assert layer.w_bit_logits.shape == (len(space.candidates) - 1, 3)
    assert skip in net.mixed_layers[1].bit_ops  # 16 -> 24 stride 2: skip is a 1x1 conv with bits


def test_sample_cost_equals_lut_latency_of_the_sampled_architecture(space):
    table = get_table(space, "sd835")
    matrix, fixed = latency_matrix(table, space), fixed_latency(table, space)
    net = Supernet(space, mode="hard")
    net.seed(3)
    net(torch.randn(2, 1, 28, 28))
    choice = [(l.last_indices[0], int(l.last_w_weights[l.last_indices[0]].argmax()), int(l.last_a_weights[l.last_indices[0]].argmax()))
              for l in net.mixed_layers]
    lat = sample_cost(net, matrix).item() + fixed
    assert lat == pytest.approx(arch_latency(table, net.choice_to_arch(choice)), rel=1e-5)


def test_soft_cost_is_the_expectation_under_the_forward_weights(space):
    matrix = latency_matrix(get_table(space, "bitfusion"), space)
    net = Supernet(space, mode="soft")
    net(torch.randn(2, 1, 28, 28))
    ops, ws, as_ = net.sample_weights()
    manual = sum(ops[l, i] * ws[l, i, b] * as_[l, i, c] * matrix[l, i, b, c]
                 for l in range(matrix.shape[0]) for i in range(matrix.shape[1])
                 for b in range(matrix.shape[2]) for c in range(matrix.shape[3]))
    assert sample_cost(net, matrix).item() == pytest.approx(float(manual), rel=1e-5)


def test_fixed_choice_runs_that_child(space):
    net = Supernet(space, mode="hard").eval()
    choice = [(0, 2, 1)] * len(net.mixed_layers)
    net.fix(choice)
    x = torch.randn(2, 1, 28, 28)
    a, b = net(x), net(x)
    assert torch.equal(a, b)
    arch = net.choice_to_arch(choice)
    assert all(l.op == space.candidates[0] and l.w_bits == 8 and l.a_bits == 8 for l in arch.layers)


def test_gumbel_noise_is_finite_and_seeded():
    g1 = gumbel_noise((10000,), torch.Generator().manual_seed(0), "cpu")
    g2 = gumbel_noise((10000,), torch.Generator().manual_seed(0), "cpu")
    assert torch.isfinite(g1).all() and torch.equal(g1, g2)
    assert abs(g1.mean().item() - 0.5772) < 0.05  # Euler-Mascheroni


def test_weight_and_arch_parameters_partition(space):
    net = Supernet(space)
    ids = {id(p) for p in net.weight_parameters()} | {id(p) for p in net.arch_parameters()}
    assert len(ids) == len(list(net.parameters()))
    assert not ({id(p) for p in net.weight_parameters()} & {id(p) for p in net.arch_parameters()})


def test_state_dict_with_the_logits_named_alpha_beta_w_beta_a_loads(space):
    net = Supernet(space)
    with torch.no_grad():
        for i, p in enumerate(net.arch_parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    names = {"op_logits": "alpha", "w_bit_logits": "beta_w", "a_bit_logits": "beta_a"}
    old = {}
    for k, v in net.state_dict().items():
        head, _, last = k.rpartition(".")
        old[f"{head}.{names.get(last, last)}" if head else k] = v
    assert "mixed_layers.0.alpha" in old and "mixed_layers.0.op_logits" not in old
    fresh = Supernet(space)
    fresh.load_state_dict(old)
    for a, b in zip(fresh.arch_parameters(), net.arch_parameters()):
        assert torch.equal(a, b)


def test_discrete_choices_use_the_logits_of_the_previous_forward(space):
    net = Supernet(space, mode="hard")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        net.mixed_layers[0].op_logits.fill_(0).data[2] = 100.0
        net(x)
        assert net.mixed_layers[0].last_indices[0] == 2  # first forward: the current logits
        net.mixed_layers[0].op_logits.fill_(0).data[3] = 100.0
        net(x)
        assert net.mixed_layers[0].last_indices[0] == 2  # one update behind: the host never waits for the device
        snapshot = net.sampler_state()
        net(x)
        assert net.mixed_layers[0].last_indices[0] == 3
        net.load_sampler_state(snapshot)  # resume restores the lag exactly
        net(x)
        assert net.mixed_layers[0].last_indices[0] == 3


def test_soft_ops_with_hard_bits_compute_every_op_with_one_bit_option_each(space):
    net = Supernet(space, mode="soft", bit_sampling="hard")
    calls, _ = _count_calls(net)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    table = latency_matrix(get_table(space, "bitfusion"), space)
    loss = F.cross_entropy(net(x), y) * sample_cost(net, table)
    loss.backward()
    for l, layer in enumerate(net.mixed_layers):
        assert all(calls.get((l, i)) == 1 for i in range(len(layer.ops)))
        for i in layer.bit_ops:
            st = layer.bit_states[i]
            assert st.w_index is not None and st.a_index is not None
            assert float(st.w_probs.sum()) == pytest.approx(1.0) and float(st.w_probs.max()) == 1.0
    for p in net.arch_parameters():
        assert p.grad is not None and torch.all(p.grad != 0), p.shape


@pytest.mark.parametrize("mode", MODES)
def test_cross_entropy_alone_reaches_the_sampled_bit_logits(space, mode):
    """Sampled bits are straight-through factors on op outputs: a BatchNorm after each conv must not cancel
    their gradient (as it would a factor on the weights)."""
    torch.manual_seed(0)
    net = Supernet(space, mode=mode, bit_sampling="hard")
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    F.cross_entropy(net(x), y).backward()
    op_grad = torch.stack([layer.op_logits.grad.abs().mean() for layer in net.mixed_layers]).mean()
    for layer in net.mixed_layers:
        ops = layer.last_indices if mode in PATHS else range(len(layer.ops))
        rows = [layer.bit_ops.index(i) for i in ops if i in layer.bit_ops]
        if rows:
            # comparable to the op logits' gradients (a factor on the weights gives ~1e-5 of them)
            assert layer.w_bit_logits.grad[rows].abs().mean() > 1e-3 * op_grad, mode
            assert layer.a_bit_logits.grad[rows].abs().mean() > 1e-3 * op_grad, mode


@pytest.mark.parametrize("mode", MODES)
def test_batched_weight_quantization_gives_the_per_conv_forward(space, mode, monkeypatch):
    import fbnas.supernet as supernet_module

    x = torch.randn(4, 1, 28, 28)
    outs = []
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(supernet_module, "prequantize_weights", lambda convs: None)
        torch.manual_seed(0)
        net = Supernet(space, mode=mode, bit_sampling="hard")
        outs.append(net(x))
        assert all(c.prequantized is None for c in net.modules() if hasattr(c, "prequantized"))
    assert torch.equal(outs[0], outs[1])


def test_soft_bits_batched_give_the_per_conv_mixtures_and_gradients(space, monkeypatch):
    """Soft bits: the batched weight mixtures and option scales (one batch per forward) give the output and the
    gradients of every conv mixing its own options."""
    import fbnas.supernet as supernet_module

    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    results = []
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(supernet_module, "prequantize_weights_mixed", lambda *a: None)
            monkeypatch.setattr(supernet_module, "prescale_activations_mixed", lambda *a: None)
        torch.manual_seed(0)
        net = Supernet(space, mode="soft", bit_sampling="soft")
        net(x)  # activation ranges observed
        out = net(x)
        F.cross_entropy(out, y).backward()
        results.append((out.detach(), {n: p.grad for n, p in net.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for name, g in results[1][1].items():
        assert g is not None, name
        torch.testing.assert_close(results[0][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_channels_last_reaches_every_layer_behind_a_one_channel_stem(space):
    """A stem over one input channel outputs NCHW whatever the layout of its input and weight; with
    use_channels_last every searched conv still sees NHWC activations, and the output is the NCHW forward's."""
    torch.manual_seed(0)
    nchw, nhwc = Supernet(space), Supernet(space)
    nhwc.load_state_dict(nchw.state_dict())
    nhwc = nhwc.use_channels_last()
    layouts = []
    for m in nhwc.mixed_layers.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: layouts.append(
                inp[0].is_contiguous(memory_format=torch.channels_last) and not inp[0].is_contiguous()))
    x = torch.randn(4, 1, 28, 28)
    nchw.fix([(3, 2, 1)] * space.num_layers)
    nhwc.fix([(3, 2, 1)] * space.num_layers)
    out = nhwc(x.contiguous(memory_format=torch.channels_last))
    assert layouts and all(layouts)
    torch.testing.assert_close(out, nchw(x), rtol=1e-4, atol=1e-4)


def test_argmax_cost_is_the_latency_of_the_derived_architecture(space):
    table = get_table(space, "sd835")
    matrix, fixed = latency_matrix(table, space), fixed_latency(table, space)
    net = Supernet(space)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    derived = net.choice_to_arch(net.argmax_choice())
    assert float(argmax_cost(net, matrix)) + fixed == pytest.approx(arch_latency(table, derived), rel=1e-5)


def test_step_stats_on_a_cpu_are_read_at_once_with_their_tag():
    stats = StepStats(torch.device("cpu"))
    values, tag = stats.push({"ce": torch.tensor(1.5), "lat": torch.tensor(0.25, requires_grad=True)}, (0, 7))
    assert values == {"ce": 1.5, "lat": 0.25} and tag == (0, 7) and stats.flush() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_stats_on_a_gpu_are_read_one_step_late():
    stats = StepStats(torch.device("cuda"))
    assert stats.push({"ce": torch.tensor(1.0, device="cuda")}, 0) is None
    assert stats.push({"ce": torch.tensor(2.0, device="cuda")}, 1) == ({"ce": 1.0}, 0)
    assert stats.flush() == ({"ce": 2.0}, 1) and stats.flush() is None


@pytest.mark.parametrize("bit_sampling", ["hard", "soft"])
def test_a_staged_forward_equals_the_eager_one_with_the_same_sample(space, bit_sampling):
    """Supernet.stage_sample + a staged forward (what a CUDA graph replays: the sampled bits as device data)
    give the eager forward's output and gradients for the same sample, and draw the same samples after."""
    torch.manual_seed(0)
    eager = Supernet(space, mode="soft", bit_sampling=bit_sampling)
    staged = Supernet(space, mode="soft", bit_sampling=bit_sampling)
    staged.load_state_dict(eager.state_dict())
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for net in (eager, staged):
        net(x)  # quantizer ranges observed once, as a plain first step does
    table = latency_matrix(get_table(space, "bitfusion"), space)
    for _ in range(3):
        eager.zero_grad(set_to_none=True)
        staged.zero_grad(set_to_none=True)
        out_eager = eager(x)
        staged.stage_sample()
        with staged.staging():
            out_staged = staged(x)
        torch.testing.assert_close(out_staged, out_eager, rtol=1e-5, atol=1e-5)
        for net, out in ((eager, out_eager), (staged, out_staged)):
            (F.cross_entropy(out, y) + sample_cost(net, table)).backward()
        for (name, p), q in zip(eager.named_parameters(), staged.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    for a, b in zip(eager.buffers(), staged.buffers()):
        torch.testing.assert_close(a, b)


def test_only_all_path_supernets_with_batched_weight_bits_can_be_staged(space):
    assert Supernet(space, mode="soft").can_stage()
    assert not Supernet(space, mode="hard").can_stage()
    assert not Supernet(space, mode="two_path").can_stage()

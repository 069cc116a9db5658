import pytest
import torch
import torch.nn.functional as F

from fbnas import load_space
from fbnas.cuda_graph import GraphedGradients, can_capture
from fbnas.supernet import Supernet


@pytest.fixture(scope="module")
def space():
    return load_space("fmnist")


def test_only_all_path_steps_on_cuda_without_host_terms_are_captured(space):
    cuda = torch.device("cuda")
    assert can_capture(cuda, Supernet(space, mode="soft")) is None
    assert can_capture(cuda, Supernet(space, mode="soft", bit_sampling="soft")) is None
    assert can_capture(torch.device("cpu"), Supernet(space, mode="soft")) == "not a CUDA device"
    assert "mode" in can_capture(cuda, Supernet(space, mode="hard"))
    assert "terms" in can_capture(cuda, Supernet(space, mode="soft"), extra_terms=[object()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("bit_sampling", ["hard", "soft"])
def test_a_replayed_step_gives_the_eager_gradients_of_the_same_sample(space, bit_sampling):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    eager, graphed = (Supernet(space, bit_sampling=bit_sampling).to(dev) for _ in range(2))
    graphed.load_state_dict(eager.state_dict())
    x, y = torch.randn(16, 1, 28, 28, device=dev), torch.randint(0, 10, (16,), device=dev)
    for net in (eager, graphed):
        net(x)  # the activation ranges, as a first eager step gives them

    def compute():
        with graphed.staging():
            loss = F.cross_entropy(graphed(x), y)
        return {"loss": loss.detach()}, loss

    step = GraphedGradients(compute, list(graphed.parameters()), warmup=1,
                            release=graphed.release_sample)
    graphed.stage_sample()
    step.capture()  # its warm-up forward moved the activation ranges: the eager net starts from them too
    eager.load_state_dict(graphed.state_dict())
    eager.generator.manual_seed(7)
    graphed.generator.manual_seed(7)
    eager.load_sampler_state(None)
    graphed.load_sampler_state(None)
    for _ in range(3):
        eager.zero_grad(set_to_none=True)
        loss = F.cross_entropy(eager(x), y)
        loss.backward()
        graphed.stage_sample()
        stats = step()
        torch.testing.assert_close(stats["loss"], loss.detach(), rtol=1e-4, atol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused mixture is compiled for a GPU")
def test_the_compiled_activation_mixture_equals_the_eager_one():
    from fbnas.quant.act import _mix_backward, _mix_forward, _mix_functions

    x = (torch.randn(8, 16, 9, 9, device="cuda") * 2).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    probs, scales = torch.tensor([0.4, 0.6], device="cuda"), torch.tensor([0.25, 0.02], device="cuda")
    levels = ((0, 15), (0, 255))
    fwd, bwd = _mix_functions(x)
    assert fwd is not _mix_forward
    inv = torch.reciprocal(scales)
    torch.testing.assert_close(fwd(x, inv, probs * scales, levels), _mix_forward(x, inv, probs * scales, levels))
    for a, b in zip(bwd(x, grad, inv, probs, scales, levels), _mix_backward(x, grad, inv, probs, scales, levels)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_failed_capture_turns_graphs_off_and_the_step_runs_eagerly(tmp_path, monkeypatch):
    """A capture that raises (e.g. an op torch cannot capture) is logged once; that step and the rest run
    eagerly, so a search never dies of its speed-up."""
    import dataclasses

    from fbnas.config import DataConfig, DeriveConfig, SearchConfig
    from fbnas.cuda_graph import GraphedGradients
    from fbnas import search
    from fbnas.search import Searcher

    warned = []
    monkeypatch.setattr(search.log, "warning", lambda msg, *args: warned.append(msg % args))

    def failing_capture(self):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(GraphedGradients, "capture", failing_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    cfg = SearchConfig(epochs=1, warmup_epochs=0, max_steps_per_epoch=3, progress=False, threads=1,
                       data=DataConfig(name="synthetic", synthetic_size=256, batch_size=32, eval_batch_size=64,
                                       input_size=28), derive=DeriveConfig(eval_batches=1, calibration_batches=1))
    s = Searcher(dataclasses.replace(cfg), tmp_path)
    s.cuda_graph_reason = None  # as on a GPU
    x, y = next(iter(s.w_loader))
    s.weight_step(x, y, warmup=False)  # the first step is eager
    stats = s.weight_step(x, y, warmup=False)
    assert s.cuda_graph_reason == "the capture failed: operation not permitted when stream is capturing"
    assert set(stats) == {"ce", "loss", "lat"} and torch.isfinite(stats["loss"])
    assert all(p.grad is not None for p in s._w_params[:3])  # the eager backward ran
    assert len(warned) == 1 and "the steps run eagerly from here" in warned[0]

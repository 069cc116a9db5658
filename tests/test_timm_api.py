"""timm's generic model checks (as in timm's tests/test_models.py) applied to `fbnas_net`, plus checkpoint_path
loading of `fbnas train` weights and resolve_data_config giving the architecture's real input and mean/std."""
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from timm.data import resolve_data_config

from fbnas import Arch, load_space
from fbnas.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_dataset
from fbnas.quant.artifacts import load_unfolded
from fbnas.quant.export import export_run
from fbnas.train import TrainSettings, train

OPS = ["ir_k3_e3", "skip", "sqnxt_k3", "shuffle_k3", "ir_k3_e1_g2", "ir_k5_e3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny quantized training run on Fashion-MNIST: arch.json with preprocessing, model(_bn).safetensors."""
    out = tmp_path_factory.mktemp("timm_run")
    data = load_dataset("fashion_mnist", train_subset=256, test_subset=64)
    arch = replace(Arch.from_space(load_space("fmnist"), OPS, 8, 8), preprocessing=data.preprocessing())
    train(arch, data, TrainSettings(epochs=1, fold_epochs=1, batch_size=32, max_steps_per_epoch=2, calib_batches=1,
                                    eval_batch_size=64), out)
    return out, data


@pytest.fixture
def model(run):
    return timm.create_model("fbnas_net", arch=str(run[0] / "arch.json"))


def test_forward_backward_and_cfg(model):
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg and cfg["input_size"] == (1, 28, 28) and cfg["num_classes"] == 10
    x = torch.randn(2, *cfg["input_size"])
    out = model(x)
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
    out.mean().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in params), "every parameter gets a gradient"
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state


def test_resolve_data_config_gives_the_real_input_and_normalisation(model):
    dc = resolve_data_config({}, model=model)
    assert dc["input_size"] == (1, 28, 28)
    assert dc["mean"] == pytest.approx(FASHION_MNIST_MEAN) and dc["std"] == pytest.approx(FASHION_MNIST_STD)


def test_features_head_and_classifier(model):
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    feats = model.forward_features(x)
    assert feats.shape[:2] == (2, model.num_features)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, model.num_features)
    assert torch.allclose(model.forward_head(feats), model(x)) and torch.allclose(model.get_classifier()(pre), model(x))
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features) and torch.allclose(model(x), pre)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5
    model.eval()
    assert model(x).shape == (2, 5)


def test_num_classes_and_in_chans_change(run):
    arch = str(run[0] / "arch.json")
    m = timm.create_model("fbnas_net", arch=arch, num_classes=3, in_chans=3)
    assert m(torch.randn(2, 3, 28, 28)).shape == (2, 3) and m.num_classes == 3
    assert resolve_data_config({}, model=m)["input_size"] == (3, 28, 28)
    m0 = timm.create_model("fbnas_net", arch=arch, num_classes=0)
    assert m0(torch.randn(2, 1, 28, 28)).shape == (2, m0.num_features)


def test_features_only(run):
    m = timm.create_model("fbnas_net", arch=str(run[0] / "arch.json"), features_only=True)
    outs = m(torch.randn(2, 1, 28, 28))
    assert [o.shape[1] for o in outs] == m.feature_info.channels() == [16, 24, 40, 80]
    assert m.feature_info.reduction() == [2, 4, 8, 16]
    assert [o.shape[-1] for o in outs] == [14, 7, 4, 2]  # 'same' padding: ceil(28 / reduction)
    last = timm.create_model("fbnas_net", arch=str(run[0] / "arch.json"), features_only=True, out_indices=(3,))
    assert [o.shape[1] for o in last(torch.randn(1, 1, 28, 28))] == [80]


def test_unknown_kwargs_are_rejected(run):
    with pytest.raises(TypeError, match="drop_path_rate"):
        timm.create_model("fbnas_net", arch=str(run[0] / "arch.json"), drop_path_rate=0.1)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_is_not_supported_and_trace_is(model):
    model.eval()
    with pytest.raises((OSError, RuntimeError), match="BitState"):
        torch.jit.script(model)  # documented in fbnas/timm_models.py: the shared Python BitState per op
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(torch.jit.trace(model, x)(x), model(x))


def test_checkpoint_path_loads_the_folded_model_as_the_exported_float_network(run, tmp_path):
    import onnxruntime as ort

    out, data = run
    m = timm.create_model("fbnas_net", arch=str(out / "arch.json"), checkpoint_path=str(out / "model.safetensors"))
    m.eval()
    export_run(out, tmp_path, ["onnx_fp32"])
    x = data.test.x[:16]
    sess = ort.InferenceSession(str(tmp_path / "model_fp32.onnx"), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        got = m(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_checkpoint_path_loads_the_bn_model_quantized_or_float(run):
    out, data = run
    x = data.test.x[:8]
    ref = load_unfolded(out / "model_bn.safetensors")
    q = timm.create_model("fbnas_net", arch=str(out / "arch.json"), quantized=True,
                          checkpoint_path=str(out / "model_bn.safetensors")).eval()
    with torch.no_grad():
        assert torch.equal(q(x), ref(x))
    f = timm.create_model("fbnas_net", arch=str(out / "arch.json"), checkpoint_path=str(out / "model_bn.safetensors"))
    assert torch.equal(f.stem.conv.weight, ref.stem.conv.weight)
    with pytest.raises(Exception, match="model_bn.safetensors"):
        timm.create_model("fbnas_net", arch=str(out / "arch.json"), quantized=True,
                          checkpoint_path=str(out / "model.safetensors"))

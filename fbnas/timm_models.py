"""`timm.create_model("fbnas_net", arch="arch.json")`: found architectures in timm's model registry, with timm's
model API: pretrained_cfg (the architecture's real input size and mean/std), num_features, get_classifier /
reset_classifier, forward_features / forward_head, feature_info and `features_only=True` (timm's FeatureHookNet),
and `checkpoint_path=` for the weights files of `fbnas train` (model_bn.safetensors, an FP32 run's
model.safetensors, or a quantized run's folded model.safetensors, whose BN-folded convs load as float convs).

TorchScript (`torch.jit.script`) is not supported: every conv shares a Python BitState object (a dataclass) with
its op, the bit-widths its quantizers read at run time, and TorchScript cannot compile it. Use `torch.export` (`fbnas export`
writes .pt2 programs), `torch.jit.trace`, or ONNX.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, register_model

from .arch import Arch, load_arch
from .errors import CheckpointError, ConfigError
from .model import FbnasNet
from .quant.fake import ConvBNAct, QLinear

IMAGEFOLDER_CROP = 1 / 1.14  # fbnas.data's ImageFolder test transform: resize to 1.14x, centre crop


def feature_info(arch: Arch) -> list[dict[str, Any]]:
    """The last module at each reduction (stem, then the searchable layers), as timm's feature_info."""
    by_reduction: dict[int, dict[str, Any]] = {}
    reduction = arch.stem_stride
    by_reduction[reduction] = {"num_chs": arch.stem_channels, "reduction": reduction, "module": "stem"}
    for i, layer in enumerate(arch.layers):
        reduction *= layer.stride
        by_reduction[reduction] = {"num_chs": layer.channels, "reduction": reduction, "module": f"layers.{i}"}
    return list(by_reduction.values())


def _normalisation(arch: Arch) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where they come from): arch.json's preprocessing, else the dataset named in its provenance."""
    from .data import CIFAR_MEAN, CIFAR_STD, FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD

    pre = arch.preprocessing
    if "mean" in pre and "std" in pre:
        mean, std, source = tuple(pre["mean"]), tuple(pre["std"]), "arch.json preprocessing"
    else:
        known = {"fashion_mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD), "cifar10": (CIFAR_MEAN, CIFAR_STD),
                 "cifar100": (CIFAR_MEAN, CIFAR_STD), "imagefolder": (IMAGENET_MEAN, IMAGENET_STD)}
        dataset = pre.get("dataset") or ((arch.provenance.get("config") or {}).get("data") or {}).get("name")
        mean, std = known.get(dataset, ((0.0,), (1.0,)))  # synthetic or unknown: the data are used as they are
        source = f"dataset {dataset}" if dataset in known else "none recorded (identity)"
    c = arch.in_channels
    if len(mean) != c:  # e.g. in_chans changed: one value per channel
        mean, std = (sum(mean) / len(mean),) * c, (sum(std) / len(std),) * c
    return mean, std, source


def pretrained_cfg(arch: Arch) -> dict[str, Any]:
    mean, std, _ = _normalisation(arch)
    imagefolder = arch.preprocessing.get("dataset") == "imagefolder"
    return {"architecture": "fbnas_net", "num_classes": arch.num_classes,
            "input_size": (arch.in_channels, arch.input_size, arch.input_size), "pool_size": None,
            "interpolation": "bilinear", "crop_pct": IMAGEFOLDER_CROP if imagefolder else 1.0, "crop_mode": "center",
            "mean": mean, "std": std, "first_conv": "stem.conv", "classifier": "head.classifier",
            "license": "", "tag": arch.space}


class FbnasTimmNet(FbnasNet):
    """FbnasNet with timm's model interface; the state_dict keys are FbnasNet's."""

    def __init__(self, arch: Arch, quantized: bool = False, num_classes: Optional[int] = None,
                 in_chans: Optional[int] = None, drop_rate: float = 0.0, global_pool: str = "avg"):
        if global_pool != "avg":
            raise ConfigError(f"fbnas_net: global_pool={global_pool!r}; only 'avg' (the searched head) is built")
        if num_classes is not None and num_classes != arch.num_classes and num_classes > 0:
            arch = dataclasses.replace(arch, num_classes=num_classes)
        if in_chans is not None and in_chans != arch.in_channels:
            arch = dataclasses.replace(arch, in_channels=in_chans)
        super().__init__(arch, quantized=quantized, dropout=drop_rate)
        self.num_classes = arch.num_classes
        self.num_features = self.head_hidden_size = arch.head_channels
        self.drop_rate = drop_rate
        self.feature_info = feature_info(arch)
        if num_classes == 0:
            self.reset_classifier(0)

    def get_classifier(self) -> nn.Module:
        return self.head.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "avg"):
            raise ConfigError(f"fbnas_net: global_pool={global_pool!r}; only 'avg' is built")
        old = self.head.classifier
        self.num_classes = num_classes
        if num_classes > 0:
            bit_state = old.bit_state if isinstance(old, QLinear) else self.head.conv.conv.bit_state
            weight = next(self.head.conv.parameters())
            self.head.classifier = QLinear(self.num_features, num_classes, bit_state=bit_state).to(weight.device)
            self.arch = dataclasses.replace(self.arch, num_classes=num_classes)
        else:
            self.head.classifier = nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, searchable layers and the 1x1 head conv: [N, num_features, h, w]."""
        return self.head.conv(super().forward_features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head.dropout(self.head.pool(x).flatten(1))
        return x if pre_logits else self.head.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also takes the folded model of a quantized `fbnas train` run (keys nodes.*): each BN-folded conv loads
        as the conv's weight with an identity BN carrying the folded bias (the same float function in eval)."""
        if any(k.startswith("nodes.") for k in state_dict):
            state_dict = self._unfold(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _unfold(self, folded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if any(getattr(m, "bit_state", None) is not None and m.bit_state.enabled for m in self.modules()):
            raise CheckpointError("a folded model.safetensors loads into the float fbnas_net only; for "
                                  "quantized=True use the run's model_bn.safetensors")
        state = {k: v.clone() for k, v in self.state_dict().items()}

        def take(node: str, what: str) -> torch.Tensor:
            key = f"nodes.{node.replace('.', '/')}.{what}"
            if key not in folded:
                raise CheckpointError(f"folded weights lack {key!r}: they come from another architecture")
            return folded[key]

        for name, module in self.named_modules():
            if isinstance(module, ConvBNAct):
                state[f"{name}.conv.weight"] = take(name, "weight")
                state[f"{name}.bn.weight"] = torch.ones_like(module.bn.weight)
                state[f"{name}.bn.bias"] = take(name, "bias")
                state[f"{name}.bn.running_mean"] = torch.zeros_like(module.bn.running_mean)
                state[f"{name}.bn.running_var"] = torch.full_like(module.bn.running_var, 1.0 - module.bn.eps)
        if isinstance(self.head.classifier, QLinear):
            state["head.classifier.weight"] = take("head.classifier", "weight")
            state["head.classifier.bias"] = take("head.classifier", "bias")
        return state


@register_model
def fbnas_net(pretrained: bool = False, arch: Arch | str | None = None, **kwargs) -> FbnasTimmNet:
    """A network found by fbnas. `arch`: an Arch or an arch.json path; `quantized=True` gives the fake-quant
    model at the arch's bits (default: the float model, e.g. for fine-tuning with timm's train script).
    Other keywords: num_classes, in_chans, drop_rate, global_pool='avg', features_only, out_indices."""
    if arch is None:
        raise ConfigError("timm.create_model('fbnas_net') needs arch=<path to arch.json>")
    if pretrained:
        raise ConfigError("fbnas_net has no hub weights; load a trained run's weights with "
                          "checkpoint_path=<run>/model.safetensors (or model_bn.safetensors)")
    a = arch if isinstance(arch, Arch) else load_arch(arch)
    kwargs.pop("cache_dir", None)
    cfg = pretrained_cfg(a if kwargs.get("in_chans") is None else dataclasses.replace(a, in_channels=kwargs["in_chans"]))
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("pretrained_cfg", None)
    return build_model_with_cfg(FbnasTimmNet, "fbnas_net", False, pretrained_cfg=cfg,
                                pretrained_cfg_overlay=overlay, arch=a,
                                feature_cfg={"feature_cls": "hook", "no_rewrite": True,
                                             "out_indices": tuple(range(len(feature_info(a))))}, **kwargs)

"""`timm.create_model("fbnas_net", arch="arch.json")`: found architectures in timm's model registry."""
from __future__ import annotations

import dataclasses

from timm.models import register_model

from .arch import Arch, load_arch
from .errors import ConfigError
from .model import FbnasNet


@register_model
def fbnas_net(pretrained: bool = False, arch: Arch | str | None = None, quantized: bool = False,
              num_classes: int | None = None, in_chans: int | None = None, drop_rate: float = 0.0,
              **kwargs) -> FbnasNet:
    """A network found by fbnas. `arch`: an Arch or an arch.json path; `quantized=True` gives the fake-quant
    model at the arch's bits (default: the float model, e.g. for fine-tuning with timm's train script)."""
    if arch is None:
        raise ConfigError("timm.create_model('fbnas_net') needs arch=<path to arch.json>")
    if pretrained:
        raise ConfigError("fbnas_net has no hub weights; load a trained model.safetensors with load_state_dict")
    a = arch if isinstance(arch, Arch) else load_arch(arch)
    if num_classes is not None and num_classes != a.num_classes:
        a = dataclasses.replace(a, num_classes=num_classes)
    if in_chans is not None and in_chans != a.in_channels:
        a = dataclasses.replace(a, in_channels=in_chans)
    kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    return FbnasNet(a, quantized=quantized, dropout=drop_rate)

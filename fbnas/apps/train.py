"""`fbnas train arch=<arch.json> ...`: QAT (or FP32) training of a found architecture; see fbnas.train."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from ..config import TrainData, TrainSettings
from .common import CONF_DIR, output_dir, run_hydra, user_errors

log = logging.getLogger("fbnas")


@dataclass
class TrainConfig(TrainSettings):
    arch: str = MISSING
    resume: bool = False
    dist_timeout_s: float = 300.0  # under torchrun: rendezvous and collective timeout (docs/distributed.md)
    data: TrainData = field(default_factory=TrainData)


ConfigStore.instance().store(name="train_schema", node=TrainConfig)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
@user_errors
def _app(cfg: DictConfig) -> None:
    from ..arch import load_arch
    from ..data import check_matches_space, load_dataset
    from ..train import train

    arch = load_arch(cfg.arch)
    settings = TrainSettings(**{f.name: cfg[f.name] for f in fields(TrainSettings)})
    data = load_dataset(cfg.data.name, root=cfg.data.root, train_subset=cfg.data.train_subset,
                        test_subset=cfg.data.test_subset, seed=settings.seed, input_size=arch.input_size,
                        num_classes=arch.num_classes, in_channels=arch.in_channels)
    check_matches_space(data, arch.in_channels, arch.input_size, arch.num_classes, arch.space)
    arch = replace(arch, preprocessing=data.preprocessing())  # what the trained model expects, kept in arch.json
    out = output_dir()
    metrics = train(arch, data, settings, out, resume=cfg.resume)
    from ..distributed import current

    if not current().is_main:
        return
    keys = [k for k in ("acc_float", "acc_float_of_qat_weights", "acc_fake_quant_bn", "acc_fake_quant",
                        "acc_integer", "integer_vs_fake_top1_disagreements") if k in metrics]
    print(f"{out}: " + ", ".join(f"{k}={metrics[k]}" for k in keys))


def main(argv: list[str]) -> int:
    return run_hydra(_app, "fbnas train", argv)

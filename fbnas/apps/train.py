"""`fbnas train arch=<arch.json> ...`: QAT (or FP32) training of a found architecture; see fbnas.train."""
from __future__ import annotations

import logging
from dataclasses import asdict, fields, replace

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..config import RENAMED, TrainConfig, TrainSettings
from .common import CONF_DIR, output_dir, renamed, run_hydra, user_errors

log = logging.getLogger("fbnas")


ConfigStore.instance().store(name="train_schema", node=TrainConfig)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
@user_errors
def _app(cfg: DictConfig) -> None:
    from ..arch import load_arch
    from ..data import check_matches_space, load_data
    from ..train import train
    from ..wandb_run import check_logger, start_wandb

    config: TrainConfig = OmegaConf.to_object(cfg)
    check_logger(config.logger)
    arch = load_arch(config.arch)
    settings = TrainSettings(**{f.name: getattr(config, f.name) for f in fields(TrainSettings)})
    settings.check()
    data = load_data(config.data, settings.seed, arch.input_size, arch.num_classes, arch.in_channels)
    check_matches_space(data, arch.in_channels, arch.input_size, arch.num_classes, arch.space)
    arch = replace(arch, preprocessing=data.preprocessing())  # what the trained model expects, kept in arch.json
    out = output_dir()
    if config.threads > 0:
        import torch

        torch.set_num_threads(config.threads)
    from ..distributed import current

    main_rank = current().is_main
    run = start_wandb(config.wandb, out, asdict(config), "train") if config.logger == "wandb" and main_rank else None

    def on_epoch(rec: dict) -> None:
        run.log({f"{rec['phase']}/{k}": v for k, v in rec.items() if isinstance(v, (int, float))})

    metrics = train(arch, data, settings, out, resume=config.resume, on_epoch=on_epoch if run else None,
                    progress=config.progress)
    if not main_rank:
        return
    keys = [k for k in ("acc_float", "acc_float_of_qat_weights", "acc_fake_quant_bn", "acc_fake_quant",
                        "acc_integer", "integer_vs_fake_top1_disagreements") if k in metrics]
    if run is not None:
        run.summary.update({k: metrics[k] for k in keys})
        run.finish()
    print(f"{out}: " + ", ".join(f"{k}={metrics[k]}" for k in keys))


def main(argv: list[str]) -> int:
    return run_hydra(_app, "fbnas train", renamed(argv, RENAMED["train"]), schema=TrainConfig, config_name="train",
                     doc=__doc__)

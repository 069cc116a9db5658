"""`fbnas export run=<train run dir> [formats=[...]] [out=<dir>]`: deployable files of a trained model; see
fbnas.quant.export."""
from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..config import ExportConfig
from .common import CONF_DIR, run_hydra, user_errors

ConfigStore.instance().store(name="export_schema", node=ExportConfig)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="export")
@user_errors
def _app(cfg: DictConfig) -> None:
    from pathlib import Path

    from ..quant.export import export_run

    out = cfg.out or str(Path(cfg.run) / "export")
    written = export_run(cfg.run, out, list(cfg.formats), align=cfg.align)
    for fmt, path in written.items():
        print(f"{fmt:<12} {path}")


def main(argv: list[str]) -> int:
    return run_hydra(_app, "fbnas export", argv, schema=ExportConfig, config_name="export", doc=__doc__)

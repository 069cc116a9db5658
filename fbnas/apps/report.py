"""`fbnas report run=<search run dir> | sweep=<multirun dir> [out=<dir>]`: report.md and plots of a search, or
sweep.md and sweep.png of a multirun; see fbnas.report."""
from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..config import ReportConfig
from ..errors import ConfigError
from .common import CONF_DIR, run_hydra, user_errors

ConfigStore.instance().store(name="report_schema", node=ReportConfig)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="report")
@user_errors
def _app(cfg: DictConfig) -> None:
    from ..report import write_report, write_sweep_report

    if bool(cfg.run) == bool(cfg.sweep):
        raise ConfigError("give one of run=<search run dir> or sweep=<multirun dir>")
    paths = write_report(cfg.run, cfg.out or None) if cfg.run else write_sweep_report(cfg.sweep, cfg.out or None)
    for path in paths:
        print(f"wrote {path}")


def main(argv: list[str]) -> int:
    return run_hydra(_app, "fbnas report", argv, schema=ReportConfig, config_name="report", doc=__doc__)

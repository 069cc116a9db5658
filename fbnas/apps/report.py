"""`fbnas report run=<search run dir> [out=<dir>]`: report.md and plots of a search; see fbnas.report."""
from __future__ import annotations

from dataclasses import dataclass

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from .common import CONF_DIR, run_hydra, user_errors


@dataclass
class ReportConfig:
    run: str = MISSING  # a `fbnas search` run directory (metrics.jsonl, arch.json)
    out: str = ""  # default: the run directory


ConfigStore.instance().store(name="report_schema", node=ReportConfig)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="report")
@user_errors
def _app(cfg: DictConfig) -> None:
    from ..report import write_report

    for path in write_report(cfg.run, cfg.out or None):
        print(f"wrote {path}")


def main(argv: list[str]) -> int:
    return run_hydra(_app, "fbnas report", argv)

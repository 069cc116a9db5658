"""`fbnas search [key=value ...]` (and `-m` sweeps): differentiable architecture and bit-width search."""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..config import SearchConfig
from .common import CONF_DIR, output_dir, run_hydra_with_device, user_errors

ConfigStore.instance().store(name="search_schema", node=SearchConfig)
log = logging.getLogger("fbnas")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="search")
@user_errors
def _app(cfg: DictConfig) -> None:
    from ..search import run_search

    config: SearchConfig = OmegaConf.to_object(cfg)
    out = output_dir()
    result = run_search(config, out)
    from ..distributed import current

    if not current().is_main:  # rank 0 prints and writes the report
        return
    arch = result.arch
    print(arch.summary())
    pred = arch.predicted
    print(f"predicted latency on {result.device}: {result.latency_ms:.4f} ms | size {pred['size_kb']:.1f} KB | "
          f"{pred['bops'] / 1e9:.3f} GBOPs | arch: {out / 'arch.json'}")
    o = config.objective
    if o.kind == "target" and o.limit_ms is not None and result.latency_ms > o.limit_ms:
        print(f"fbnas: warning: the found architecture takes {result.latency_ms:.4g} ms, over objective.limit_ms="
              f"{o.limit_ms} ms by {100 * (result.latency_ms / o.limit_ms - 1):.1f}%; search longer or raise "
              "objective.eta", file=sys.stderr)
    if config.report:
        from ..report import write_report

        print(f"report: {write_report(out)[0]}")


def main(argv: list[str]) -> int:
    return run_hydra_with_device(_app, "fbnas search", argv, schema=SearchConfig, config_name="search", doc=__doc__)

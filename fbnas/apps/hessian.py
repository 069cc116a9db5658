"""`fbnas hessian checkpoint=... | arch=... weights=... [key=value ...]`: per-layer Hessian traces -> hessian.json."""
from __future__ import annotations

import sys
import warnings

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..config import RENAMED, HessianRunConfig
from .common import CONF_DIR, renamed, run_hydra, user_errors

ConfigStore.instance().store(name="hessian_schema", node=HessianRunConfig)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"fbnas: warning: {message}", file=sys.stderr)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="hessian")
@user_errors
def _app(cfg: DictConfig) -> None:
    from ..hessian.estimator import HessianConvergenceWarning
    from ..hessian.run import run_hessian

    run_cfg: HessianRunConfig = OmegaConf.to_object(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("always", HessianConvergenceWarning)
        warnings.showwarning = _show_warning
        record, paths, result = run_hessian(run_cfg)
    print(result.table())
    print(f"engine {result.method}, {result.n_hvp} probes, {result.seconds:.1f} s")
    for p in paths:
        print(f"wrote {p}")


def main(argv: list[str]) -> int:
    return run_hydra(_app, "fbnas hessian", renamed(argv, RENAMED["hessian"]), schema=HessianRunConfig,
                     config_name="hessian", doc=__doc__)

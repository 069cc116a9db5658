"""`fbnas pareto runs=[...] [baselines=[random:12,handcrafted,uniform_bits]] ...`: train searched networks and
baselines with one recipe and compare integer-only accuracy at equal device latency; see fbnas.pareto."""
from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..config import RENAMED, ParetoConfig
from .common import CONF_DIR, output_dir, renamed, run_hydra_with_device, user_errors

ConfigStore.instance().store(name="pareto_schema", node=ParetoConfig)
_ARGV: list[str] = []


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="pareto")
@user_errors
def _app(cfg: DictConfig) -> None:
    from ..pareto import run_pareto

    config: ParetoConfig = OmegaConf.to_object(cfg)
    out = output_dir()
    result = run_pareto(config, out, command=" ".join(["fbnas pareto", *_ARGV]))
    st = result.stats
    print(f"{len(result.records)} networks, {st.total} trainings ({st.trained} trained now, {st.skipped} reused); "
          f"wrote {out / 'pareto.json'}, {out / 'pareto.md'}, {out / 'pareto.png'}")


def main(argv: list[str]) -> int:
    _ARGV[:] = argv = renamed(argv, RENAMED["pareto"])
    return run_hydra_with_device(_app, "fbnas pareto", argv, schema=ParetoConfig, config_name="pareto", doc=__doc__)

"""`fbnas quantize <action> [key=value ...]`: the integer-only model of a trained run and its checks.

  convert   integer.safetensors + quant_params.json of a train run (run=<dir> or weights=)
  compare   integer-only vs folded fake-quant, every tensor; naive-vs-integer L2 per block
  ilp       HAWQ-V3 ILP bit allocation under size / BOPs / latency limits (arch= run= latency_ratio= device=)
  onnx      the QLinear / QDQ / integer-accumulator ONNX graph checked against the integer model in onnxruntime

`fbnas quantize <action> --help` shows every field (docs/deploy.md explains them).
"""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..config import QuantizeConfig
from ..errors import CHECK_FAILED_EXIT, ConfigError
from ..io import atomic_write_text
from .common import CONF_DIR, HELP_FLAGS, device_overrides, run_hydra, show_help, split_subcommand, user_errors

ACTIONS = ("convert", "compare", "ilp", "onnx")

ConfigStore.instance().store(name="quantize_schema", node=QuantizeConfig)


def _weights(cfg) -> Path:
    if cfg.weights:
        return Path(cfg.weights)
    if cfg.run:
        return Path(cfg.run) / "model.safetensors"
    raise ConfigError("give run=<train run dir> or weights=<model.safetensors>")


def _arch(cfg):
    from ..arch import load_arch

    return load_arch(cfg.arch) if cfg.arch else None


def _test_images(cfg, n: int):
    from ..data import load_dataset

    bundle = load_dataset(cfg.data.name, root=cfg.data.root, test_subset=n)
    return bundle.test.x[:n] if n > 0 else bundle.test.x


def _convert(cfg) -> None:
    from ..quant.artifacts import load_folded, save_integer
    from ..quant.integer import to_integer

    folded = load_folded(_weights(cfg), _arch(cfg), cfg.arch)
    folded.set_rounding(cfg.rounding)
    out = Path(cfg.out or (cfg.run or "."))
    save_integer(out, to_integer(folded))
    print(f"wrote {out / 'integer.safetensors'} and {out / 'quant_params.json'}")


def _compare(cfg) -> None:
    from ..quant.artifacts import load_folded, load_unfolded
    from ..quant.compare import compare_models, format_comparison, naive_vs_integer
    from ..quant.integer import to_integer

    x = _test_images(cfg, cfg.samples)
    folded = load_folded(_weights(cfg), _arch(cfg), cfg.arch)
    folded.set_rounding(cfg.rounding)
    res = compare_models(folded, to_integer(folded), x)
    text = ["## integer-only vs folded fake-quant (every tensor, integer domain)", "", format_comparison(res)]
    bn_path = Path(cfg.run) / "model_bn.safetensors" if cfg.run else None
    if bn_path is not None and bn_path.is_file():
        bn = load_unfolded(bn_path, _arch(cfg), cfg.arch)
        calib = [x[: len(x) // 2], x[len(x) // 2:]]
        for b in cfg.bits:
            r = naive_vs_integer(bn, int(b), calib, x, cfg.rounding)
            text += ["", f"## naive fake quant (float BN, float residuals) vs integer-only, W{b}A{b} (post-training fold)",
                     "", "| block | rel. L2 |", "|---|---:|"]
            text += [f"| {blk['block']} | {blk['rel_l2_naive_vs_integer']:.4g} |" for blk in r["blocks"]]
    report = "\n".join(text) + "\n"
    if cfg.out:
        atomic_write_text(cfg.out, report)
    print(report)
    if res["first_mismatch"]:
        raise SystemExit(CHECK_FAILED_EXIT)


def _ilp(cfg) -> None:
    from ..ilp import LIMIT_KEYS, ilp_arch, read_hessian, weight_perturbation
    from ..space import load_space

    if not cfg.arch:
        raise ConfigError("ilp needs arch=<arch.json>")
    arch = _arch(cfg)
    space = load_space(arch.space)
    if cfg.hessian:
        omega = read_hessian(cfg.hessian)
        source = f"hessian {cfg.hessian}"
    else:
        from ..quant.artifacts import load_folded

        folded = load_folded(_weights(cfg), arch, cfg.arch)
        omega = weight_perturbation(folded, len(arch.layers), space.w_bits)
        source = f"weight perturbation of {_weights(cfg)}"
    from ..latency import get_table, load_device

    device = load_device(cfg.device_file or cfg.device)
    table = get_table(space, device, cfg.lut or None)
    res = ilp_arch(arch, omega, space.w_bits, space.a_bits,
                   limits={k: float(cfg[k]) for k in LIMIT_KEYS},
                   ratios={k: float(cfg[k.split("_")[0] + "_ratio"]) for k in LIMIT_KEYS},
                   table=table, device=device.name, source=source)
    out = cfg.out or str(Path(cfg.arch).with_name("arch_ilp.json"))
    res.arch.save(out)
    bits = " ".join(f"w{w}a{a}" for w, a in res.choices)
    print(f"wrote {out}: {bits}; " + ", ".join(f"{k} {v:.6g} (limit {res.limits[k]:.6g})" for k, v in res.totals.items()))


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="quantize")
@user_errors
def _app(cfg: DictConfig) -> None:
    from ..quant.dyadic import check_rounding

    check_rounding(cfg.rounding)
    if cfg.action == "convert":
        _convert(cfg)
    elif cfg.action == "compare":
        _compare(cfg)
    elif cfg.action == "ilp":
        _ilp(cfg)
    elif cfg.action == "onnx":
        from ..quant.onnx_check import onnx_command

        onnx_command(cfg, _weights(cfg), _arch(cfg), _test_images)
    else:
        raise ConfigError(f"unknown action {cfg.action!r}")


def main(argv: list[str]) -> int:
    if argv and argv[0] in HELP_FLAGS:
        return show_help("fbnas quantize <action>", __doc__, QuantizeConfig, "quantize", argv[1:])
    sub, rest = split_subcommand(argv, ACTIONS, "quantize")
    try:
        rest = device_overrides(rest)
    except SystemExit as exc:  # fail(): the one-line message is printed already
        return exc.code if isinstance(exc.code, int) else 2
    return run_hydra(_app, f"fbnas quantize {sub}", [f"action={sub}"] + rest, schema=QuantizeConfig,
                     config_name="quantize", doc=__doc__)

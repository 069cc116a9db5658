"""`fbnas <command> --help`: every config field with its type, starting value and description (one source: the
comments of the config dataclasses); renamed fields still work, with a warning; help starts without torch."""
import dataclasses
import importlib
import subprocess
import sys
import warnings

import pytest

from fbnas import config
from fbnas.apps.common import renamed
from fbnas.cli import COMMANDS
from fbnas.cli import main as cli
from fbnas.fieldhelp import descriptions, nested_configs

HYDRA_COMMANDS = ("search", "train", "hessian", "pareto", "lut", "quantize", "export", "report")


def _all_configs() -> set[type]:
    from hydra.core.config_store import ConfigStore

    for cmd in HYDRA_COMMANDS:
        importlib.import_module(COMMANDS[cmd])
    roots = [obj for obj in vars(config).values() if isinstance(obj, type) and dataclasses.is_dataclass(obj)]
    roots += [ConfigStore.instance().load(f"{name}_schema.yaml").node._metadata.object_type
              for name in HYDRA_COMMANDS]
    return {cls for root in roots for cls in nested_configs(root)}


def test_every_field_of_every_config_has_a_description():
    configs = _all_configs()
    assert {config.SearchConfig, config.TrainConfig, config.HessianRunConfig, config.LutConfig,
            config.ObjectiveConfig, config.HessianConfig} <= configs
    missing = [f"{cls.__name__}.{f.name}" for cls in configs for f in dataclasses.fields(cls)
               if not descriptions(cls).get(f.name, "").strip()]
    assert missing == []


def test_continuation_comments_join_and_inherited_fields_keep_theirs():
    d = descriptions(config.SearchConfig)
    assert d["tau_final"].startswith("decay geometrically") and d["tau_final"].endswith("never separates)")
    train = descriptions(config.TrainConfig)
    assert train["epochs"].startswith("phase 1") and train["arch"].startswith("the architecture to train")
    assert "fine-tune a mixed-bit model" in train["weights"]  # the comment line below the field


@pytest.mark.parametrize("argv, line", [
    (["search", "--help"], ("objective.limit_ms=null", "float|null", "kind=target: keep the derived net's latency under this (ms)")),
    (["search", "device=bitfusion", "epochs=3", "--help"], ("epochs=3", "int", "epochs of the search")),
    (["search", "-h"], ("device=sd835", "group", "choices: a11, bitfusion")),
    (["train", "--help"], ("max_steps_per_epoch=0", "int", ">0: cap the steps per epoch")),
    (["train", "--help"], ("arch=(required)", "str", "the architecture to train")),
    (["hessian", "--help"], ("data.name=null", "str|null", "fashion_mnist | cifar10")),
    (["pareto", "--help"], ("train.lr=0.05", "float", "peak learning rate")),
    (["lut", "--help"], ("filter=\"\"", "str", "show: only keys containing this text")),
    (["lut", "build", "--help"], ("action=build", "str", "set by the sub-command")),
    (["quantize", "ilp", "--help"], ("device=bitfusion", "group", "ilp: latency device")),
    (["export", "--help"], ("formats=[all]", "list", "arch safetensors pt2")),
    (["report", "--help"], ("sweep=\"\"", "str", "fbnas search -m")),
])
def test_help_lists_fields_with_type_value_and_description(argv, line, capsys):
    assert cli(argv) == 0
    out = capsys.readouterr().out
    row = next((l for l in out.splitlines() if l.split() and l.split()[0] == line[0]), None)
    assert row is not None, out[-3000:]
    assert row.split()[1] == line[1] and line[2] in row


def test_hessian_help_starts_without_torch():
    code = ("import sys; from fbnas.cli import main; assert main(['hessian', '--help']) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_renamed_fields_still_work_with_a_warning(capsys):
    assert renamed(["steps_per_epoch=2", "+dataset=x", "epochs=1"], {**config.RENAMED["train"],
                                                                   **config.RENAMED["hessian"]}) \
        == ["max_steps_per_epoch=2", "+data.name=x", "epochs=1"]
    assert renamed(["train.steps_per_epoch=1"], config.RENAMED["pareto"]) == ["train.max_steps_per_epoch=1"]
    err = capsys.readouterr().err
    assert "field 'steps_per_epoch' is now 'max_steps_per_epoch'" in err and "field 'dataset' is now" in err
    with pytest.warns(DeprecationWarning, match="max_steps_per_epoch"):
        assert config.TrainSettings(steps_per_epoch=3).max_steps_per_epoch == 3
    with pytest.warns(DeprecationWarning) as got:
        h = config.HessianRunConfig(dataset="synthetic", data_root="/d")
    assert (h.data.name, h.data.root) == ("synthetic", "/d")
    assert sorted(str(w.message).split("'")[1] for w in got) == ["data_root", "dataset"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config.TrainSettings().max_steps_per_epoch == 0
    assert "steps_per_epoch" not in dataclasses.asdict(config.TrainSettings())
    # a checkpoint or pareto result saved under the old name reads in today's names
    assert config.current_names({"steps_per_epoch": 2, "lr": 0.1}) == {"max_steps_per_epoch": 2, "lr": 0.1}

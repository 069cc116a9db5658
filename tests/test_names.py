"""Names that become file names are validated: a space or device named with a path (`../../x`, `/abs`) is a
one-line error and nothing is written outside latency_tables/ or runs/."""
from pathlib import Path

import pytest
import yaml

from fbnas.apps.common import _dir_label
from fbnas.cli import main
from fbnas.errors import ConfigError
from fbnas.io import check_name, repo_root

REPO = repo_root()


@pytest.mark.parametrize("bad", ["../../x", "/tmp/x", "a/b", "..", ".hidden", "", "x y", "a\\b", 3])
def test_check_name_refuses_paths(bad):
    with pytest.raises(ConfigError, match="becomes part of file names"):
        check_name(bad, "field 'name'")


def test_check_name_accepts_names():
    for ok in ("fmnist", "sd835_4t", "my-phone.v2"):
        assert check_name(ok, "x") == ok


def written_files(root: Path) -> set:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("what", ["space", "device"])
def test_lut_build_refuses_a_traversal_name(tmp_path, capsys, what, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if what == "space":
        raw = yaml.safe_load((REPO / "search_spaces" / "fmnist.yaml").read_text())
        raw["name"] = "../../escaped"
        p = tmp_path / "space.yaml"
        args = [f"space={p}"]
    else:
        raw = yaml.safe_load((REPO / "conf" / "device" / "sd835.yaml").read_text())
        raw["name"] = "../../escaped"
        p = tmp_path / "dev.yaml"
        args = [f"device={p}"]
    p.write_text(yaml.safe_dump(raw))
    before = written_files(REPO / "latency_tables") | written_files(tmp_path)
    for sub in ("build", "import"):
        assert main(["lut", sub, *args] + ([f"csv={tmp_path / 'm.csv'}"] if sub == "import" else [])) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "field 'name' is '../../escaped'" in err, err
    assert written_files(REPO / "latency_tables") | written_files(tmp_path) == before
    assert not (REPO.parent / "escaped__sd835.json").exists() and not (REPO.parent / "fmnist__escaped.json").exists()


def test_device_name_on_the_command_line_is_checked(capsys):
    assert main(["lut", "check", "device=../../etc/passwd"]) == 2
    assert "unknown device" in capsys.readouterr().err


def test_run_directory_label_stays_one_component():
    assert _dir_label("../../x") == "x"
    assert _dir_label("/abs/path/my_space.yaml") == "my_space"
    assert _dir_label("..") == "unnamed"
    assert "/" not in _dir_label("a b/c?d")


def test_device_yaml_elsewhere_with_shipped_defaults(tmp_path):
    from fbnas.latency import load_device

    p = tmp_path / "mine.yaml"
    p.write_text("defaults: [sd835, _self_]\nname: mine\ndescription: sd835 with another name\n")
    dev = load_device(str(p))
    assert dev.name == "mine" and dev.type == load_device("sd835").type
    assert dev.params == load_device("sd835").params

"""Data folders and user tables: where fbnas reads conf/, search_spaces/, latency_tables/ and writes tables."""
import json

from fbnas.cli import main as cli
from fbnas.io import data_dir, is_checkout, repo_root, table_dirs, writable_tables_dir
from fbnas.latency import load_table, table_path, writable_table_path


def test_a_checkout_reads_its_top_level_folders():
    assert is_checkout()
    for name in ("conf", "search_spaces", "latency_tables"):
        assert data_dir(name) == repo_root() / name and data_dir(name).is_dir()
    assert (data_dir("conf") / "search.yaml").is_file() and (data_dir("conf") / "device" / "sd835.yaml").is_file()


def test_user_tables_come_first_and_lut_build_writes_there(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FBNAS_TABLES_DIR", str(tmp_path))
    shipped = data_dir("latency_tables")
    assert writable_tables_dir() == tmp_path and table_dirs() == [tmp_path, shipped]
    assert table_path("fmnist", "a11") == shipped / "fmnist__a11.json"  # no user table yet: the shipped one
    assert writable_table_path("fmnist", "a11") == tmp_path / "fmnist__a11.json"
    assert cli(["lut", "build", "space=fmnist", "device=a11"]) == 0
    assert str(tmp_path / "fmnist__a11.json") in capsys.readouterr().out
    assert table_path("fmnist", "a11") == tmp_path / "fmnist__a11.json"
    ours, theirs = load_table(tmp_path / "fmnist__a11.json"), load_table(shipped / "fmnist__a11.json")
    assert ours.entries.keys() == theirs.entries.keys()
    assert json.loads((tmp_path / "fmnist__a11.json").read_text())["device"] == "a11"

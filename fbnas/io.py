"""Atomic file writes: a temp file in the same directory, fsync, then rename. No half-written outputs."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ConfigError, FbnasError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed over `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs are for sharing
        os.replace(tmp_path, path)
        fsync_dir(path.parent)  # the rename itself survives a power loss
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the `.<name>.*.tmp` files atomic_path leaves when its process is killed mid-write (call only while
    holding the directory's run lock: nobody else is writing there)."""
    removed = []
    for p in Path(directory).rglob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line (metrics); a line is written whole with a single write call."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The whole JSON-object lines of a metrics file ([] without one); a torn line (a kill during the write) is
    skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def truncate_jsonl(path: str | os.PathLike, keep: Callable[[dict], bool]) -> list[dict]:
    """Rewrite a metrics file (atomically) with only its whole JSON-object lines that `keep` accepts; a torn
    last line (a kill during the write) or the lines of epochs after a checkpoint are dropped."""
    if not Path(path).is_file():
        return []
    kept = [rec for rec in read_jsonl(path) if keep(rec)]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


DATA_FOLDERS = ("conf", "search_spaces", "latency_tables")
TABLES_ENV = "FBNAS_TABLES_DIR"


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_name(name: Any, where: str) -> str:
    """A space or device name becomes part of a file name (latency_tables/<space>__<device>.json, run
    directories): letters, digits, '_', '.', '-' only, no path separators, not starting with '.'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{where} is {name!r}; a name may hold only letters, digits, '_', '.' and '-' and must not "
                          "start with '.' (it becomes part of file names)")
    return name


def repo_root() -> Path:
    """The source checkout, when fbnas runs from one (editable install or PYTHONPATH)."""
    return Path(__file__).resolve().parent.parent


def data_dir(name: str) -> Path:
    """A shipped data folder (conf, search_spaces, latency_tables). An installed wheel carries them as package
    data, fbnas/_data/<name> (setup.py's build step copies the checkout's top-level folders there); run from a
    source checkout, they are the checkout's own top-level folders, the only copy in the repository."""
    from importlib.resources import files

    if name not in DATA_FOLDERS:
        raise ValueError(f"unknown data folder {name!r}")
    packaged = files("fbnas") / "_data" / name
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return repo_root() / name


def is_checkout() -> bool:
    """True when the data folders come from a source checkout rather than an installed package."""
    return data_dir("conf") == repo_root() / "conf"


def writable_tables_dir() -> Path:
    """Where `fbnas lut build|import` write tables by default: $FBNAS_TABLES_DIR if set; in a source checkout its
    latency_tables/ (tables are committed there); in an installed package the user's data directory
    (platformdirs: ~/.local/share/fbnas/latency_tables on Linux), since site-packages may be read-only and a
    reinstall replaces it."""
    env = os.environ.get(TABLES_ENV)
    if env:
        return Path(env).expanduser()
    if is_checkout():
        return data_dir("latency_tables")
    from platformdirs import user_data_dir

    return Path(user_data_dir("fbnas")) / "latency_tables"


def table_dirs() -> list[Path]:
    """Latency-table folders in lookup order: the writable one (user-built tables), then the shipped one."""
    dirs = [writable_tables_dir(), data_dir("latency_tables")]
    return [d for i, d in enumerate(dirs) if d not in dirs[:i]]


def read_json(path: str | os.PathLike, missing: str, error: type[FbnasError] = ConfigError) -> Any:
    """Parse a JSON file; a missing file or malformed JSON is `error` with one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno} ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise error(f"{path}: malformed JSON{where}") from None


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file; malformed YAML is a ConfigError naming the file and line."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = (str(getattr(exc, "problem", None) or exc).splitlines() or ["?"])[0]
        raise ConfigError(f"{path}:{where} malformed YAML ({problem}); fix the syntax") from None

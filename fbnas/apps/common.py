"""Shared plumbing for the Hydra apps: run a @hydra.main function with given overrides, turn user errors
(FbnasError) into one line on stderr and exit code 2, and Hydra's own config errors into exit code 2; lock a
run directory before Hydra writes into it (RunDirGuard)."""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.experimental.callback import Callback

from ..errors import FbnasError
from ..io import data_dir
from ..rundir import LOCK_NAME, acquire, release, release_all

CONF_DIR = str(data_dir("conf"))
log = logging.getLogger("fbnas")


def _dir_label(value: Any) -> str:
    """A space or device given by name or path -> one safe path component for the run directory
    (`space=../x.yaml` -> `x`): the run directory never leaves runs/."""
    import re

    stem = Path(str(value)).name
    for suffix in (".yaml", ".yml"):
        stem = stem.removesuffix(suffix)
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).strip(".")
    return label or "unnamed"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("fbnas_label", _dir_label, replace=True)


_register_resolvers()


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def one_line(msg: str) -> str:
    """An error text as one printable line: terminal escape codes removed, line breaks joined."""
    msg = _ANSI.sub("", str(msg))
    return "; ".join(part.strip() for part in msg.splitlines() if part.strip())


def fail(msg: str, quiet: bool = False) -> None:
    """One line on stderr, exit 2; `quiet`: exit 2 only (another rank prints the line)."""
    if not quiet:
        print(f"fbnas: error: {one_line(msg)}", file=sys.stderr)
    raise SystemExit(2)


def _rank() -> int:
    from ..distributed import current

    return current().rank


def _required(key: str) -> str:
    return f"field {key!r} is required: add {key}=<value> to the command line"


def _user_message(exc: BaseException) -> Optional[str]:
    """The one-line message of an error caused by the user's input that is not fbnas's own type: a required field
    left out (Hydra's ???), a path that cannot be read or written. None: a bug, shown with its traceback."""
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", None) or "?"
        return _required(key)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or type(exc).__name__}; give a path that can be used there"
    return None


def _remove_if_only_hydra_files() -> None:
    """After a user error, remove the run directory Hydra made for this job if it holds nothing but Hydra's
    own files (.hydra/, *.log): a failed start leaves no output behind. A directory with anything else (a
    checkpoint of a run being resumed, results) is never touched."""
    import shutil

    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return
    if not out.is_dir() or out.resolve() == Path.cwd().resolve() or _rank() != 0:
        return
    if all(p.name in (".hydra", LOCK_NAME) or (p.is_file() and p.suffix == ".log") for p in out.iterdir()):
        _drop_file_handlers(out)
        shutil.rmtree(out, ignore_errors=True)


def _drop_file_handlers(folder: Path) -> None:
    """Close and detach the log file handlers (Hydra's <job>.log) writing into `folder`, so that nothing in this
    process writes there again once it is removed."""
    root = folder.resolve()
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in list(lg.handlers):
            if isinstance(h, logging.FileHandler) and root in Path(h.baseFilename).resolve().parents:
                lg.removeHandler(h)
                h.close()


def run_plain(fn: Callable, *args) -> int:
    """Run a command without Hydra (list, info): FbnasError -> one line on stderr, exit code 2."""
    try:
        fn(*args)
    except FbnasError as exc:
        print(f"fbnas: error: {exc}", file=sys.stderr)
        return 2
    return 0


def user_errors(fn: Callable) -> Callable:
    """Decorate a Hydra task function: FbnasError (and a missing field, an unusable path) -> one line on stderr,
    exit 2, no traceback; any failure removes a run directory that holds only Hydra's files."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FbnasError as exc:
            _remove_if_only_hydra_files()
            fail(str(exc), quiet=getattr(exc, "printed_by_rank0", False) and _rank() != 0)
        except KeyboardInterrupt:
            _remove_if_only_hydra_files()
            print("fbnas: interrupted", file=sys.stderr)
            raise SystemExit(130)
        except Exception as exc:  # every failed start leaves nothing behind, whatever the error
            _remove_if_only_hydra_files()
            msg = _user_message(exc)
            if msg is None:
                raise
            fail(msg)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


HELP_FLAGS = ("-h", "--help")


def show_help(prog: str, doc: str, schema: type, config_name: str, overrides: list[str]) -> int:
    """`fbnas <command> --help`: the command's doc, then every field of its config with its type, the value it starts
    from (the composed config with the given overrides) and its description (fbnas.fieldhelp)."""
    from ..fieldhelp import format_rows, rows

    values: Any = {}
    given = [o for o in overrides if not o.startswith("-")]
    try:
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            values = OmegaConf.to_container(compose(config_name, overrides=given), resolve=False)
    except Exception as exc:  # a bad override: the defaults, and the reason
        print(f"fbnas: warning: showing the defaults; the overrides do not compose: {one_line(str(exc))}",
              file=sys.stderr)
    groups = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    text = (f"{doc.strip()}\n\nusage: {prog} [key=value ...]   (Hydra overrides; --cfg job prints the composed "
            f"config)\n\nfields (key=value it starts from, type, description):\n"
            f"{format_rows(rows(schema, values, groups))}\n")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `fbnas search --help | head`
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def run_hydra(app: Callable, prog: str, overrides: list[str], schema: Optional[type] = None,
              config_name: str = "", doc: str = "") -> int:
    """Call a @hydra.main-decorated `app` as if `prog overrides...` had been typed. With `schema` (the config
    dataclass) and `config_name`, -h/--help shows every field with its description instead of Hydra's help."""
    if schema is not None and any(o in HELP_FLAGS for o in overrides):
        return show_help(prog, doc, schema, config_name, overrides)
    saved = sys.argv
    sys.argv = [prog] + list(overrides)
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        # Hydra reports its own config errors (unknown key, wrong type) with exit 1; they are user errors.
        return 2 if code == 1 else code
    finally:
        sys.argv = saved
        release_all()
    return 0


def renamed(argv: list[str], names: dict[str, str]) -> list[str]:
    """Overrides with renamed fields (fbnas.config.RENAMED: old -> new) given their new names, each with a one-line
    warning; `+`/`++`/`~` prefixes are kept."""
    out = []
    for tok in argv:
        prefix = tok[: len(tok) - len(tok.lstrip("+~"))]
        key, eq, value = tok[len(prefix):].partition("=")
        if key in names:
            print(f"fbnas: warning: field {key!r} is now {names[key]!r}; the old name will be removed",
                  file=sys.stderr)
            tok = f"{prefix}{names[key]}{eq}{value}"
        out.append(tok)
    return out


def run_hydra_with_device(app: Callable, prog: str, argv: list[str], **help_spec: Any) -> int:
    """run_hydra after device_overrides: an unknown device is a one-line error (exit 2) before Hydra starts."""
    try:
        overrides = device_overrides(argv)
    except SystemExit as exc:  # fail(): the one-line message is printed already
        return exc.code if isinstance(exc.code, int) else 2
    return run_hydra(app, prog, overrides, **help_spec)


def _missing_fields(cfg: Any, prefix: str = "") -> list[str]:
    """Required fields (???) left unset, outside Hydra's own node."""
    from omegaconf import DictConfig, OmegaConf

    out = []
    for key in cfg.keys():
        if not prefix and key == "hydra":
            continue
        if OmegaConf.is_missing(cfg, key):
            out.append(prefix + str(key))
        elif isinstance(cfg._get_node(key), DictConfig):
            out += _missing_fields(cfg[key], f"{prefix}{key}.")
    return out


class RunDirGuard(Callback):
    """Hydra callback (conf/search.yaml, conf/train.yaml): before Hydra writes .hydra/ into the run directory,
    refuse a missing required field, `resume=true` without a checkpoint and a checkpoint without `resume=true`,
    then lock the directory. A refused start creates and changes nothing."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        self._guard(Path(str(OmegaConf.select(config, "hydra.run.dir"))), config, created_here=True)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        self._lock(Path(str(OmegaConf.select(config, "hydra.sweep.dir"))))

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            self._guard(Path(HydraConfig.get().runtime.output_dir), config, created_here=False)

    @staticmethod
    def _guard(run_dir: Path, config: Any, created_here: bool) -> None:
        missing = _missing_fields(config)
        if missing:
            fail(_required(missing[0]))
        existed = run_dir.exists()
        from ..distributed import current

        dist = current()
        lock, msg = None, None
        if dist.is_main:  # rank 0 holds the run directory for the job
            try:
                lock = acquire(run_dir)
            except FbnasError as exc:
                msg = str(exc)
        try:
            dist.agree(msg)
        except FbnasError as exc:
            fail(str(exc), quiet=not dist.is_main)
        if "resume" in config:
            from ..checkpoint import LAST, resume_problem  # torch: imported once a run starts, not for --help

            msg = resume_problem(run_dir / LAST, bool(config.resume))
        if msg:
            if lock is not None:
                release(lock)
            if created_here and not existed and dist.is_main:
                import shutil

                shutil.rmtree(run_dir, ignore_errors=True)
            fail(msg, quiet=not dist.is_main)

    @staticmethod
    def _lock(run_dir: Path) -> Path:
        try:
            return acquire(run_dir)
        except FbnasError as exc:
            fail(str(exc))


def split_subcommand(argv: list[str], known: tuple[str, ...], command: str) -> tuple[str, list[str]]:
    if not argv or argv[0] not in known:
        got = argv[0] if argv else "nothing"
        fail(f"'fbnas {command}' needs a sub-command ({' | '.join(known)}), got {got!r}")
    return argv[0], argv[1:]


def output_dir() -> Path:
    """The Hydra run directory of the current task (cwd is not changed: hydra.job.chdir=False)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def device_overrides(rest: list[str]) -> list[str]:
    """`device=<path.yaml>` -> `device_file=<path>`; an unknown device name (also inside a -m sweep list) -> one-line
    error instead of Hydra's 'no match in the defaults list'. The device is the config group conf/device/."""
    out = []
    for tok in rest:
        if tok.startswith("device="):
            from ..latency.devices import known_devices

            val = tok.split("=", 1)[1]
            if val.endswith((".yaml", ".yml")):
                out.append(f"device_file={val}")
                continue
            for name in val.split(","):
                if name not in known_devices():
                    fail(f"unknown device {name!r}; known devices: {', '.join(known_devices())} "
                         f"(or device=path/to/device.yaml)")
        out.append(tok)
    return out

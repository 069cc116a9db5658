"""Shared plumbing for the Hydra apps: run a @hydra.main function with given overrides, turn user errors
(FbnasError) into one line on stderr and exit code 2, and Hydra's own config errors into exit code 2."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

from ..errors import FbnasError
from ..io import data_dir

CONF_DIR = str(data_dir("conf"))
log = logging.getLogger("fbnas")


def fail(msg: str) -> None:
    print(f"fbnas: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


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
    if not out.is_dir() or out.resolve() == Path.cwd().resolve():
        return
    if all(p.name == ".hydra" or (p.is_file() and p.suffix == ".log") for p in out.iterdir()):
        logging.shutdown()
        shutil.rmtree(out, ignore_errors=True)


def run_plain(fn: Callable, *args) -> int:
    """Run a command without Hydra (list, info): FbnasError -> one line on stderr, exit code 2."""
    try:
        fn(*args)
    except FbnasError as exc:
        print(f"fbnas: error: {exc}", file=sys.stderr)
        return 2
    return 0


def user_errors(fn: Callable) -> Callable:
    """Decorate a Hydra task function: FbnasError -> one line on stderr, exit 2, no traceback, no output."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FbnasError as exc:
            _remove_if_only_hydra_files()
            fail(str(exc))
        except KeyboardInterrupt:
            print("fbnas: interrupted", file=sys.stderr)
            raise SystemExit(130)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


def run_hydra(app: Callable, prog: str, overrides: list[str]) -> int:
    """Call a @hydra.main-decorated `app` as if `prog overrides...` had been typed."""
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
    return 0


def run_hydra_with_device(app: Callable, prog: str, argv: list[str]) -> int:
    """run_hydra after device_overrides: an unknown device is a one-line error (exit 2) before Hydra starts."""
    try:
        overrides = device_overrides(argv)
    except SystemExit as exc:  # fail(): the one-line message is printed already
        return exc.code if isinstance(exc.code, int) else 2
    return run_hydra(app, prog, overrides)


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

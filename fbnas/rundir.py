"""One run per directory: an exclusive lock file (`.fbnas.lock`, holding pid, host and start time) created with
O_EXCL before anything else is written. A lock whose process is gone (same host, pid not alive) is stale and
taken over; a live one, or one from another host, is a one-line error."""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import FbnasError

LOCK_NAME = ".fbnas.lock"
_held: list[Path] = []


class RunDirBusy(FbnasError):
    """Another live process holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_owner(lock: Path) -> dict:
    try:
        owner = json.loads(lock.read_text())
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire(run_dir: str | os.PathLike) -> Path:
    """Create run_dir (if needed) and its lock file; returns the lock path. Raises RunDirBusy if another live
    process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_owner(lock)
            pid, host = owner.get("pid"), owner.get("host")
            if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            if not owner:  # being written this instant by another process, or unreadable
                time.sleep(0.05)
                if not _read_owner(lock):
                    raise RunDirBusy(f"{run_dir}: locked by {lock} (unreadable); if no run uses this directory, "
                                     "delete that file") from None
                continue
            if pid == me["pid"] and host == me["host"]:
                return lock  # held by this process already (the CLI locked it before calling the library)
            where = "this host" if host == me["host"] else f"host {host}"
            raise RunDirBusy(f"{run_dir}: in use by another run (pid {pid} on {where}, since "
                             f"{owner.get('started', '?')}); wait for it to finish or choose another hydra.run.dir"
                             + ("" if host == me["host"] else f" (delete {lock} if that run is gone)")) from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me) + "\n")
        _held.append(lock)
        return lock
    raise RunDirBusy(f"{run_dir}: could not take the lock {lock}; try again")


@contextmanager
def hold(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Lock run_dir for the duration (a no-op if this process holds it already) and clear stale temp files."""
    from .io import remove_stale_temps

    held_before = Path(run_dir) / LOCK_NAME in _held
    lock = acquire(run_dir)
    remove_stale_temps(run_dir)
    try:
        yield lock
    finally:
        if not held_before:
            release(lock)


def release(lock: Path) -> None:
    if lock in _held:
        _held.remove(lock)
        owner = _read_owner(lock)
        if owner.get("pid") == os.getpid():
            lock.unlink(missing_ok=True)


def release_all() -> None:
    for lock in list(_held):
        release(lock)

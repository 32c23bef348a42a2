"""One writer per workdir: an exclusive lock file naming the process that trains there.

Two trainers on one workdir delete each other's checkpoints (each one's Orbax manager cleans the
other's unfinished saves and applies its own retention) and leave checkpoints of one run beside the
other's config. `WorkdirLock` is taken by the training loop before anything is written: the file
`<workdir>/LOCK` holds the pid and host of its owner and is created atomically (written under a
private name, then hard-linked into place, which fails when a lock exists). A lock whose process is
gone (same host, pid not alive) is stale: it is removed and taken over with a warning. A lock
held by a live process, or by another host (whose processes cannot be checked from here), stops
the run with `WorkdirLockedError` naming the owner and the file to delete if it is really gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "LOCK"


class WorkdirLockedError(RuntimeError):
    """Another live process trains in this workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def read_lock(path: str | os.PathLike) -> dict | None:
    """The owner recorded in a lock file, or None when it is missing or unreadable."""
    try:
        owner = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds `<workdir>/LOCK` for the block (see the module doc)."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.held = False

    def _stale(self, owner: dict | None) -> bool:
        if owner is None:  # unreadable: the link is atomic, so this is damage, not a half-write
            return True
        pid, host = owner.get("pid"), owner.get("host")
        if host != socket.gethostname() or not isinstance(pid, int):
            return False
        return pid != os.getpid() and not _pid_alive(pid)

    def acquire(self) -> "WorkdirLock":
        self.workdir.mkdir(parents=True, exist_ok=True)
        private = self.path.with_name(f".{LOCK_NAME}.{self.owner['host']}.{os.getpid()}")
        private.write_text(json.dumps(self.owner))
        try:
            for _ in range(5):
                try:
                    os.link(private, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    pass
                owner = read_lock(self.path)
                if not self._stale(owner):
                    who = ("this process" if owner.get("pid") == os.getpid()
                           and owner.get("host") == self.owner["host"]
                           else f"pid {owner.get('pid')} on host {owner.get('host')}")
                    raise WorkdirLockedError(
                        f"workdir {self.workdir} is in use by {who} (since {owner.get('started')}); "
                        f"wait for it to finish, or delete {self.path} if that process is gone")
                aside = self.path.with_name(f"{LOCK_NAME}.stale-{int(time.time() * 1e6)}")
                try:
                    os.replace(self.path, aside)  # another contender may have moved it already
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                log.warning("took over the stale lock %s (pid %s on %s is not running)", self.path,
                            (owner or {}).get("pid"), (owner or {}).get("host"))
            raise WorkdirLockedError(f"could not take the lock {self.path} (contended)")
        finally:
            private.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held and read_lock(self.path) == self.owner:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["WorkdirLock", "WorkdirLockedError", "LOCK_NAME", "read_lock"]

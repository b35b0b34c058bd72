"""One writer per folder: an exclusive ``flock`` on ``<folder>/.lock``.

``with FolderLock(sweep_dir, what="sweep folder"):`` takes the lock or fails at once
with a :class:`FolderLockedError` (a ConfigError: the CLI prints one paragraph, exit 2)
naming the holder's pid, host, command and start time, and the fix.

Semantics (Linux ``flock(2)``):

- The lock belongs to the open file; the kernel drops it when the holder closes it,
  exits or is killed (SIGKILL included), so a crashed run never leaves a stale lock. The
  ``.lock`` file itself stays (removing it would race with a new holder); its contents
  describe the last holder and are rewritten by the next one.
- Non-blocking: a second writer never waits.
- Two ``FolderLock`` objects on one folder in one process conflict too (each opens its
  own file description), so a re-entrant bug is caught rather than hidden.
- ``flock`` works across processes of one machine and on local file systems; on NFS
  (Linux >= 2.6.12 emulates it with byte-range locks) it usually works as well, but a
  folder shared by several machines over a file system without lock support is not
  protected. The holder's host is written so that the message says where to look.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from trainers.errors import ConfigError

LOCK_NAME = ".lock"


class FolderLockedError(ConfigError):
    """The folder is locked by another live process."""

    def __init__(self, folder: Path, holder: dict, what: str):
        self.folder = Path(folder)
        self.holder = holder
        pid, host = holder.get("pid", "unknown"), holder.get("host", "unknown host")
        started = holder.get("started", "an unknown time")
        command = holder.get("command")
        problem = (f"the {what} is in use by another alwa-sweep process (pid {pid} on {host}, "
                   f"started {started}" + (f", command: {command}" if command else "") + ").")
        here = socket.gethostname()
        stop = f"`kill {pid}`" + ("" if host == here else f" on {host}")
        hint = (f"Wait for it to finish, or stop it ({stop}); the lock is released as soon as "
                "that process ends, even if it crashed. Or use another folder.")
        super().__init__(str(folder), problem, hint)


def read_holder(folder: str | os.PathLike) -> dict:
    """What the last (or current) holder wrote into ``<folder>/.lock``; ``{}`` if nothing."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text(errors="replace")
        data = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class FolderLock:
    """An exclusive, non-blocking lock on ``folder`` (created if missing)."""

    def __init__(self, folder: str | os.PathLike, *, what: str = "folder",
                 command: list[str] | str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        argv = sys.argv if command is None else command
        self.command = argv if isinstance(argv, str) else shlex.join(str(a) for a in argv)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: already held by this FolderLock")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(str(self.folder), f"cannot create the lock file {LOCK_NAME} "
                              f"({exc.strerror or exc}).", "Choose a folder you can write to.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(str(self.folder), f"cannot lock {self.path} ({exc.strerror}).",
                                  "Use a folder on a local disk.") from None
            raise FolderLockedError(self.folder, self._holder_info(), self.what) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "started_unix": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(str(self.folder), f"cannot write the lock file ({exc.strerror}).",
                              "Free some space or choose another folder.") from None
        self._fd = fd
        return self

    def _holder_info(self) -> dict:
        # The holder writes its details just after locking: give it a moment.
        for _ in range(20):
            info = read_holder(self.folder)
            if info:
                return info
            time.sleep(0.01)
        return {}

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # nobody is holding it any more
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __del__(self):  # a forgotten lock is released with the object (the kernel would at exit)
        try:
            self.release()
        except Exception:
            pass

"""Checkpoints: atomic writes, a SHA-256 beside each file, safe loading, fallback.

A checkpoint is ``ckpt_<iteration>.pt`` (written to a temporary name, then renamed)
and ``ckpt_<iteration>.pt.sha256``. Loading verifies the digest and uses
``torch.load(weights_only=True)``; a truncated or corrupt file is skipped with a
warning and the previous checkpoint is used instead.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch

from trainers.errors import CheckpointWriteError, NoResumableCheckpointError

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def save_checkpoint(state: dict, directory: str | Path, iteration: int, keep: int | None = 3) -> Path:
    """Write ``state`` for ``iteration``; keep the newest ``keep`` checkpoints of
    ``directory`` (``None``: remove none).

    On any write error (disk full, quota, permissions, a vanished folder) the temporary
    files are removed, the existing checkpoints are left as they were, and
    :class:`~trainers.errors.CheckpointWriteError` names the folder and its free space.
    """
    directory = Path(directory)
    path = directory / f"ckpt_{iteration:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    digest_tmp = path.with_name(path.name + ".sha256.tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
        digest = _digest(tmp)
        digest_tmp.write_text(digest + "\n")
        os.replace(tmp, path)
        os.replace(digest_tmp, path.with_name(path.name + ".sha256"))
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not _is_write_failure(exc):
            _remove_quietly(tmp, digest_tmp)
            raise
        _remove_quietly(tmp, digest_tmp)
        if path.exists() and not path.with_name(path.name + ".sha256").exists():
            _remove_quietly(path)  # renamed, but its digest could not follow
        raise _write_error(directory, path, exc) from None
    except BaseException:  # SIGTERM/SIGINT (Interrupted, KeyboardInterrupt) mid-write: no half file stays
        _remove_quietly(tmp, digest_tmp)
        if path.exists() and not path.with_name(path.name + ".sha256").exists():
            _remove_quietly(path)
        raise
    for old in list_checkpoints(directory)[:-keep] if keep is not None else ():
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def _is_write_failure(exc: RuntimeError) -> bool:
    # torch's zip writer reports a failed write as RuntimeError("... file write failed")
    text = str(exc).lower()
    return "write" in text or "no space" in text or isinstance(exc.__cause__, OSError)


def _remove_quietly(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def _free_space(directory: Path) -> str:
    for folder in (directory, *directory.parents):
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            continue
        return f"{free / 2**20:,.1f} MiB free"
    return "free space unknown"


def _write_error(directory: Path, path: Path, exc: BaseException) -> CheckpointWriteError:
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = "Free some disk space (or lower --keep / the checkpoint frequency) and resume."
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "Make the folder writable, or choose another work folder, and resume."
        else:
            hint = "Check the disk and the folder, then resume from the last checkpoint."
    else:
        reason = " ".join(str(exc).split())[:200]
        hint = "Check the disk's free space and the folder, then resume from the last checkpoint."
    return CheckpointWriteError(str(directory), f"cannot write checkpoint {path.name} ({reason}; "
                                f"{_free_space(directory)}). The partial file was removed; the "
                                "previous checkpoints are intact.", hint)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


class CorruptCheckpointError(RuntimeError):
    pass


def load_checkpoint_file(path: str | Path) -> dict:
    """Load one checkpoint safely, verifying its digest when one is present."""
    path = Path(path)
    digest_file = path.with_name(path.name + ".sha256")
    if digest_file.exists():
        expected = digest_file.read_text().strip()
        if _digest(path) != expected:
            raise CorruptCheckpointError(f"{path}: SHA-256 does not match {digest_file.name}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, an unpickling error, …
        raise CorruptCheckpointError(f"{path}: cannot be loaded ({exc})") from exc


def load_latest_checkpoint(directory_or_file: str | Path) -> tuple[dict, Path] | None:
    """The newest loadable checkpoint (of a directory, or the given file and its older
    siblings), falling back past corrupt ones with a warning; ``None`` when there is none."""
    target = Path(directory_or_file)
    if target.is_file():
        candidates = [p for p in list_checkpoints(target.parent) if p.name <= target.name] or [target]
    else:
        candidates = list_checkpoints(target)
    for path in reversed(candidates):
        try:
            return load_checkpoint_file(path), path
        except CorruptCheckpointError as exc:
            warnings.warn(f"skipping corrupt checkpoint: {exc}; falling back to the previous one",
                          stacklevel=2)
    return None


def check_checkpoint_file(path: str | Path) -> str | None:
    """Why ``path`` is not an intact checkpoint, or ``None`` if it is; loads nothing.

    Checks the SHA-256 digest when its ``.sha256`` file is there, and the zip container
    ``torch.save`` writes (every member's CRC), without unpickling anything.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty (0 bytes)"
        digest_file = path.with_name(path.name + ".sha256")
        if digest_file.exists():
            expected = digest_file.read_text().strip()
            if _digest(path) != expected:
                return f"SHA-256 does not match {digest_file.name}"
        if not zipfile.is_zipfile(path):
            return "not a torch checkpoint (no zip container)"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                return f"member {bad} is corrupt"
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "not a torch checkpoint (no data.pkl)"
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        return f"cannot be read ({exc})"
    return None


def find_resumable_checkpoint(directory_or_file: str | Path) -> Path | None:
    """The newest intact checkpoint (see :func:`check_checkpoint_file`), or ``None``.

    Same candidates as :func:`load_latest_checkpoint` (a folder's checkpoints, or a file
    and its older siblings), checked newest first, without loading any into memory.
    """
    for path in reversed(_candidates(Path(directory_or_file))):
        if check_checkpoint_file(path) is None:
            return path
    return None


def require_resumable_checkpoint(directory_or_file: str | Path, field: str = "--resume") -> Path:
    """:func:`find_resumable_checkpoint`, or :class:`NoResumableCheckpointError` saying why.

    Meant to run before anything is created (MLflow run, folders), so that ``--resume``
    of an empty or all-corrupt folder fails with one paragraph.
    """
    target = Path(directory_or_file)
    if not target.exists():
        raise NoResumableCheckpointError(f"{field} = {target}", "does not exist.",
                                         "Pass a checkpoint file or the folder holding ckpt_*.pt files.")
    candidates = _candidates(target)
    if not candidates:
        raise NoResumableCheckpointError(f"{field} = {target}", "holds no checkpoint (no "
                                         "ckpt_<iteration>.pt file).",
                                         "Pass the work folder of the run to resume, or start afresh "
                                         "without --resume.")
    problems = []
    for path in reversed(candidates):
        problem = check_checkpoint_file(path)
        if problem is None:
            return path
        problems.append(f"{path.name}: {problem}")
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    raise NoResumableCheckpointError(f"{field} = {target}", f"all {len(candidates)} checkpoints "
                                     f"are corrupt or truncated ({shown}).",
                                     "Start afresh without --resume, or restore the folder from a backup.")


def _candidates(target: Path) -> list[Path]:
    if target.is_file():
        return [p for p in list_checkpoints(target.parent) if p.name <= target.name] or [target]
    return list_checkpoints(target)

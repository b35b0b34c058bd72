"""Checkpoints: atomic writes, a SHA-256 beside each file, safe loading, fallback.

A checkpoint is ``ckpt_<iteration>.pt`` (written to a temporary name, then renamed)
and ``ckpt_<iteration>.pt.sha256``. Loading verifies the digest and uses
``torch.load(weights_only=True)``; a truncated or corrupt file is skipped with a
warning and the previous checkpoint is used instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path

import torch

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def save_checkpoint(state: dict, directory: str | Path, iteration: int, keep: int = 3) -> Path:
    """Write ``state`` for ``iteration``; keep the newest ``keep`` checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt_{iteration:08d}.pt"
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    digest = _digest(tmp)
    os.replace(tmp, path)
    digest_tmp = path.with_name(path.name + ".sha256.tmp")
    digest_tmp.write_text(digest + "\n")
    os.replace(digest_tmp, path.with_name(path.name + ".sha256"))
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


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

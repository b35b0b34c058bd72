"""Checks of where a sweep writes, done before launch (the cluster: ``alwa_sweep.preflight``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from trainers.errors import ConfigError

DEFAULT_RUNS_DIR = "alwa_runs"


def runs_root(runs_dir: str | None) -> Path:
    return Path(runs_dir or DEFAULT_RUNS_DIR).resolve()


def check_writable(folder: Path, field: str) -> None:
    """The folder exists (or can be created) and accepts files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
            pass
    except OSError as exc:
        raise ConfigError(field, f"cannot write to {folder} ({exc.strerror or exc}).",
                          "Choose a folder you can write to.") from None

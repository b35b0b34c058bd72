"""Checks of where a sweep writes and which cluster it reaches, done before launch."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

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


def check_address(address: str | None, timeout: float = 3.0) -> None:
    """Fail fast (before anything is created) when a Ray cluster address can't be reached."""
    if address is None:
        return
    if address == "auto":
        if os.environ.get("RAY_ADDRESS") or Path("/tmp/ray/ray_current_cluster").exists():
            return
        raise ConfigError("--address", "'auto' found no running Ray cluster on this machine.",
                          "Start one with `ray start --head`, or give ray://host:port, or leave --address out "
                          "for a local runtime.")
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ConfigError("--address", f"{address!r} is not of the form host:port or ray://host:port.")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError("--address", f"cannot reach the Ray cluster at {host}:{port} ({exc}).",
                          "Check that the head node runs (`ray status` there) and the port is open.") from None

"""Helpers of the cluster tests (a module with a unique name: ``conftest`` is ambiguous
when several test folders have one)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def tiny_spec_file(tmp_path, resources=None) -> str:
    """A one-trial spec whose dataset need not exist (runs use --no-check-paths)."""
    spec = {"name": "pre", "experiment": "pre-test",
            "base": {"dataset": {"kind": "voc", "root": str(tmp_path / "nowhere"), "train_sets": ["2007/trainval"],
                                 "test_sets": ["2007/test"], "scale": [128, 128], "num_workers": 0},
                     "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
                     "schedule": {"unit": "iter", "max_iters": 4, "steps": [2], "warmup_iters": 0}},
            "grid": {"weighting.method": ["none"]}, "resources": resources or {"cpus_per_worker": 1}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)

"""A real PostgreSQL server and a real ``mlflow server`` for tests and benchmarks.

PostgreSQL is Debian's (``apt-get install postgresql``): its binaries live off PATH
(``/usr/lib/postgresql/<v>/bin``) and refuse to run as root, so as root the server runs
as the ``postgres`` user (shared/RAY_MLFLOW_NOTES.md). It listens on loopback only, in
a folder of its own; ``stop()`` shuts it down (``pg_ctl -m fast stop``).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server binaries (the newest version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or ([shutil.which("initdb")]
                                                                     if shutil.which("initdb") else [])
    return Path(found[-1]).parent if found else None


def postgres_missing() -> str | None:
    """Why a PostgreSQL test cannot run here, or None."""
    if postgres_bin() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed: pip install psycopg2-binary (dev extras)"
    if os.geteuid() == 0:
        try:
            import pwd
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to run the server as"
    return None


class PostgresServer:
    def __init__(self, database: str = "mlflowdb", user: str = "mlflow"):
        import tempfile
        self.bin = postgres_bin()
        # Its own folder under /tmp: the server's user must reach it (pytest's tmp_path
        # is private to root). Removed by stop().
        self.folder = Path(tempfile.mkdtemp(prefix="alwa-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.database, self.user = database, user
        self._as = []
        if os.geteuid() == 0:
            import pwd
            entry = pwd.getpwnam("postgres")
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args, timeout=120):
        return subprocess.run([*self._as, *map(str, args)], check=True, capture_output=True, text=True,
                              timeout=timeout)

    def start(self) -> "PostgresServer":
        self._run(self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", self.user, "--no-sync")
        self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.folder / "server.log", "-w", "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        self._run(self.bin / "createdb", "-h", "127.0.0.1", "-p", self.port, "-U", self.user, self.database)
        return self

    def size_bytes(self) -> int:
        out = self._run(self.bin / "psql", "-h", "127.0.0.1", "-p", self.port, "-U", self.user, "-At", "-c",
                        f"select pg_database_size('{self.database}')", self.database)
        return int(out.stdout.strip())

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run([*self._as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on loopback over a backend store; artifacts in ``folder``."""

    def __init__(self, backend_uri: str, folder: Path, workers: int = 1):
        self.port = free_port()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                        "--default-artifact-root", (self.folder / "artifacts").resolve().as_uri(),
                        "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)]
        self.process = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        self._log = open(self.folder / "mlflow_server.log", "wb")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.folder / 'mlflow_server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mlflow server did not answer /health in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            import signal
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

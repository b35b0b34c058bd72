"""``alwa-sweep ui``: the MLflow UI on the project's store, on loopback by default."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from alwa_sweep.sweep_paths import runs_root
from alwa_sweep.tracking import default_tracking_uri, open_store, sqlite_path, sqlite_uri
from trainers.errors import ConfigError



def add_arguments(parser) -> None:
    parser.add_argument("--store", help="a tracking URI or a path to an mlflow.db file "
                        "(default: $MLFLOW_TRACKING_URI or <runs-dir>/mlflow.db)")
    parser.add_argument("--runs-dir", help="folder holding mlflow.db (default: ./alwa_runs)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow binding a non-loopback address (anyone who reaches it can read and "
                        "edit your runs unless --basic-auth is used)")
    parser.add_argument("--basic-auth", action="store_true",
                        help="serve MLflow's basic-auth app (needs mlflow[auth], "
                        "MLFLOW_FLASK_SERVER_SECRET_KEY and MLFLOW_AUTH_ADMIN_PASSWORD)")


def store_uri(store: str | None, runs_dir: str | None) -> str:
    if store is None:
        return default_tracking_uri(runs_root(runs_dir)) if runs_dir else default_tracking_uri()
    if "://" in store:
        return store
    path = Path(store)
    if path.is_dir():
        path = path / "mlflow.db"
    if not path.is_file():
        raise ConfigError("--store", f"{path} does not exist.",
                          "Run a sweep first (`alwa-sweep demo`), or pass the mlflow.db of one.")
    return sqlite_uri(path)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_command(uri: str, host: str, port: int, basic_auth: bool) -> list[str]:
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    db = sqlite_path(uri)
    if db is not None:
        command += ["--artifacts-destination", (db.parent / "artifacts").resolve().as_uri()]
    if basic_auth:
        command += ["--app-name", "basic-auth"]
    return command


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (a bind test, then a connect test)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind((host, port))
        except OSError:
            return True
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0


def wait_ready(base: str, process: subprocess.Popen, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def stop(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop the server and every process it started (its own process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def print_links(client, base: str) -> None:
    from reports import ui_links

    for experiment in ui_links.alwa_experiments(client):
        links = ui_links.install_views(client, experiment.experiment_id)
        print(f"  experiment {experiment.name!r}: {base}{ui_links.experiment_path(experiment.experiment_id)}")
        for name, path in links.values():
            print(f"    sweep {name!r} (trials by mAP): {base}{path}")


def run(args) -> int:
    if not 1 <= args.port <= 65535:
        raise ConfigError("--port", f"must be in 1..65535, got {args.port}.")
    if not is_loopback(args.host):
        if not args.allow_remote:
            raise ConfigError("--host", f"{args.host} is not a loopback address: the UI would be open to "
                              "the network.", "Add --allow-remote (and preferably --basic-auth) if you mean it.")
        print(f"warning: serving the MLflow UI on {args.host}: anyone who can reach port {args.port} can "
              "read and change your runs" + ("" if args.basic_auth else "; consider --basic-auth") + ".",
              file=sys.stderr)
    if args.basic_auth:
        missing = [v for v in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD")
                   if not os.environ.get(v)]
        if missing:
            raise ConfigError("--basic-auth", f"set {' and '.join(missing)} in the environment first.")
    if port_in_use(args.host, args.port):
        raise ConfigError("--port", f"port {args.port} on {args.host} is already in use (another "
                          "`alwa-sweep ui` or MLflow server?).",
                          "Pass a free port, e.g. --port 5001, or stop the program that holds it.")
    uri = store_uri(args.store, args.runs_dir)
    client = open_store(uri, "--store")  # create/migrate once, here, not in the server's workers
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{shown_host}:{args.port}"
    print(f"MLflow UI: {base}  (store: {uri}; Ctrl-C to stop)", flush=True)
    process = subprocess.Popen(server_command(uri, args.host, args.port, args.basic_auth),
                               start_new_session=True)

    def terminate(signum, _frame):
        raise SystemExit(128 + signum)  # the finally below stops the server (not here: a
        # handler that waits for it would deadlock with the process.wait() it interrupted)

    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if wait_ready(base, process):
            from reports.ui_links import home_path

            print(f"  experiments: {base}{home_path()}")
            print_links(client, base)
            sys.stdout.flush()
        code = process.wait()
        if code != 0:
            print(f"error: the MLflow server exited with status {code}.", file=sys.stderr)
            return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop(process)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

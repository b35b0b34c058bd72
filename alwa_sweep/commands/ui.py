"""``alwa-sweep ui``: the MLflow UI on the project's store, on loopback by default."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
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
    uri = store_uri(args.store, args.runs_dir)
    open_store(uri, "--store")  # create/migrate once, here, not in the server's workers
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"MLflow UI: http://{shown_host}:{args.port}  (store: {uri}; Ctrl-C to stop)", flush=True)
    process = subprocess.Popen(server_command(uri, args.host, args.port, args.basic_auth))
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait(timeout=15)
        return 0

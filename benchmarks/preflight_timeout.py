"""How long a bad Ray address takes to fail: plain ``ray.init`` vs alwa-sweep's probe.

Three kinds of bad address: a closed port, a port with an HTTP server (not Ray, like
the dashboard's 8265), the same as a Ray Client ``ray://`` address. ``ray.init`` runs in
a subprocess killed after ``--cap`` seconds (it is then reported as "> cap").

    python benchmarks/preflight_timeout.py --cap 45
"""

from __future__ import annotations

import argparse
import http.server
import os
import socket
import subprocess
import sys
import threading
import time

from alwa_sweep.preflight import parse_address, probe_address
from trainers.errors import ConfigError

RAY_INIT = ("import os, ray; os.environ['RAY_USAGE_STATS_ENABLED']='0'\n"
            "try:\n ray.init(address=os.environ['ADDR'], logging_level='ERROR', log_to_driver=False)\n"
            "except Exception as e: print(type(e).__name__)\n")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_ray_init(address: str, cap: float) -> float | None:
    start = time.monotonic()
    try:
        subprocess.run([sys.executable, "-c", RAY_INIT], env={**os.environ, "ADDR": address}, timeout=cap,
                       capture_output=True)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - start


def time_probe(address: str, timeout: float) -> float:
    start = time.monotonic()
    try:
        probe_address(parse_address(address), timeout)
    except ConfigError:
        pass
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cap", type=float, default=45.0)
    parser.add_argument("--probe-timeouts", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    args = parser.parse_args()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    http_port = server.server_address[1]
    cases = {"closed port": f"127.0.0.1:{closed_port()}", "HTTP server as GCS": f"127.0.0.1:{http_port}",
             "HTTP server as ray://": f"ray://127.0.0.1:{http_port}"}
    print(f"{'address':24} {'ray.init s':>11} " + " ".join(f"{'probe(' + format(t, 'g') + ') s':>12}"
                                                          for t in args.probe_timeouts) + "  ratio@5s")
    for label, address in cases.items():
        raw = time_ray_init(address, args.cap)
        probes = [time_probe(address, t) for t in args.probe_timeouts]
        raw_text = f"> {args.cap:g}" if raw is None else f"{raw:.1f}"
        ratio = (raw if raw is not None else args.cap) / max(probes[-1], 1e-3)
        print(f"{label:24} {raw_text:>11} " + " ".join(f"{p:12.2f}" for p in probes)
              + f"  {'≥ ' if raw is None else ''}{ratio:.0f}×")
    server.shutdown()


if __name__ == "__main__":
    main()

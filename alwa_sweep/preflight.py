"""Checks run before a sweep creates any MLflow state: the Ray address, the
connection (bounded in time), whether a trial can ever fit on the cluster, and whether
the MLflow store can be reached from every node.

Why the probe: ``ray.init(address="127.0.0.1:1")`` or an address whose port answers
but is not Ray's GCS (an HTTP server, the dashboard's 8265) waits for the GCS far over
a minute (measured: still waiting after 40 s; the issue reports > 150 s), and a
``ray://`` address on a non-Ray port times out after 30 s. :func:`probe_address`
instead opens a TCP connection (``timeout`` s) and then asks the GCS for its cluster
id over gRPC (``NodeInfoGcsService/GetClusterId``, the first call ``ray.init`` makes)
with a deadline; a Ray Client address (``ray://``) must complete an HTTP/2 (gRPC)
handshake. Anything else is a :class:`ConfigError` within seconds.
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from trainers.errors import ConfigError

FIELD = "--address"
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9\-.]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
_EPS = 1e-9


# ---- the address ------------------------------------------------------------------------
@dataclass(frozen=True)
class Address:
    """A parsed Ray address. ``kind``: ``gcs`` (host:port of the head's GCS, what
    ``ray start --head`` prints) or ``client`` (``ray://host:port``, the Ray Client
    server, 10001 by default)."""

    kind: str
    host: str
    port: int
    text: str
    source: str = FIELD  # where it came from: --address or RAY_ADDRESS

    @property
    def ray_init_address(self) -> str:
        return f"ray://{self.host}:{self.port}" if self.kind == "client" else f"{self.host}:{self.port}"


def parse_address(text: str, field: str = FIELD) -> Address | None:
    """``auto`` → the running cluster's address (``RAY_ADDRESS`` or the one ``ray start``
    recorded); ``host:port``; ``ray://host:port``. ``local`` → None (start a local runtime)."""
    text = text.strip()
    if text == "local":
        return None
    if text == "auto":
        return _auto_address(field)
    kind = "gcs"
    rest = text
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme != "ray":
            raise ConfigError(field, f"{text!r} has scheme {scheme!r}; a Ray address is host:port, ray://host:port "
                              "or auto.", "Use the head's GCS address (`ray start --head` prints it, port 6379 "
                              "by default) or ray://head:10001 for Ray Client.")
        kind = "client"
    host, sep, port_text = rest.rstrip("/").rpartition(":")
    if not sep or not host:
        raise ConfigError(field, f"{text!r} has no port; a Ray address is host:port, ray://host:port or auto.",
                          "E.g. --address 10.0.0.5:6379 (the head's GCS) or ray://10.0.0.5:10001.")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(field, f"the port {port_text!r} of {text!r} is not a number from 1 to 65535.",
                          "E.g. --address 10.0.0.5:6379 (the head's GCS) or ray://10.0.0.5:10001.")
    if not _HOST.fullmatch(host):
        raise ConfigError(field, f"{host!r} in {text!r} is not a host name or IP address.",
                          "E.g. --address 10.0.0.5:6379.")
    return Address(kind, host.strip("[]"), int(port_text), text, field)


def _auto_address(field: str) -> Address:
    env = os.environ.get("RAY_ADDRESS")
    if env and env != "auto":
        return parse_address(env, "RAY_ADDRESS")
    try:  # where `ray start` records the address (RAY_TMPDIR, else TMPDIR, else /tmp)
        from ray._common.utils import get_ray_address_file

        recorded = Path(get_ray_address_file(None))
    except ImportError:
        recorded = Path(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "ray_current_cluster")
    if recorded.is_file() and recorded.read_text().strip():
        return parse_address(recorded.read_text().strip(), f"{field} auto ({recorded})")
    raise ConfigError(field, "'auto' found no running Ray cluster on this machine (RAY_ADDRESS is unset and "
                      f"{recorded} does not exist).", "Start one with `ray start --head`, give host:port or "
                      "ray://host:port, or leave --address out for a local runtime.")


def effective_address(address: str | None) -> Address | None:
    """The cluster to reach: ``--address``, else ``RAY_ADDRESS`` (``ray.init`` reads it
    too), else None (a local runtime)."""
    if address is not None:
        return parse_address(address, FIELD)
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return parse_address(env, "RAY_ADDRESS")
    return None


def probe_address(addr: Address, timeout: float = 5.0) -> float:
    """Fail within about ``2 × timeout`` seconds unless a Ray head answers at ``addr``;
    returns the seconds it took."""
    start = time.monotonic()
    where = addr.text
    fix = ("Check that the head node runs (`ray status` on it), that the port is its GCS port "
           "(6379 by default; 8265 is the dashboard, for `--submit`) or its Ray Client port "
           "(ray://host:10001), and that no firewall blocks it.")
    try:
        with socket.create_connection((addr.host, addr.port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(addr.source, f"cannot reach the Ray cluster at {addr.host}:{addr.port} "
                          f"({exc.strerror or exc}).", fix) from None
    import grpc

    channel = grpc.insecure_channel(f"{addr.host}:{addr.port}")
    try:
        if addr.kind == "client":
            try:
                grpc.channel_ready_future(channel).result(timeout=timeout)
            except grpc.FutureTimeoutError:
                raise ConfigError(addr.source, f"{where} answers but is not a Ray Client server (no gRPC "
                                  f"handshake in {timeout:g} s).", fix) from None
        else:
            from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            try:
                stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
            except grpc.RpcError as exc:
                code = exc.code()
                # A GCS with token authentication on answers UNAUTHENTICATED: it is Ray.
                if code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    detail = "no answer" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name
                    raise ConfigError(addr.source, f"{addr.host}:{addr.port} answers but is not a Ray head's GCS "
                                      f"({detail} within {timeout:g} s).", fix) from None
    finally:
        channel.close()
    return time.monotonic() - start


# ---- connecting -------------------------------------------------------------------------
@dataclass
class ClusterInfo:
    address: Address | None  # None: a local runtime started here
    nodes: list[dict]  # ray.nodes() of the alive nodes
    available: dict  # node id → available resources (may be {} when unknown)
    dashboard_url: str | None
    connect_seconds: float = 0.0
    started: bool = False  # this call connected (so a failure before the sweep runs disconnects)

    def disconnect_if_started(self) -> None:
        if self.started:
            import ray

            ray.shutdown()

    @property
    def node_ips(self) -> set[str]:
        return {n.get("NodeManagerAddress", "") for n in self.nodes}


def connect(address: str | None, *, num_cpus: int | None = None, timeout: float = 5.0,
            include_dashboard: bool | None = None, out=None) -> ClusterInfo:
    """``ray.init`` bounded in time, with every failure a :class:`ConfigError`.

    ``address`` None (and no ``RAY_ADDRESS``): a local runtime with ``num_cpus``.
    Prints the dashboard URL when there is one.
    """
    import ray

    out = out or sys.stdout
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    addr = effective_address(address)
    start = time.monotonic()
    started = not ray.is_initialized()
    if not started:
        context = None
    else:
        if addr is not None:
            probe_address(addr, timeout)
            if num_cpus is not None:
                raise ConfigError("--num-cpus", f"{num_cpus} applies to a local runtime, not to the cluster at "
                                  f"{addr.text}.", "Leave --num-cpus out with --address/RAY_ADDRESS.")
        try:
            if addr is None:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                # The dashboard is what frees a killed Train driver's placement group.
                dashboard = _dashboard_available() if include_dashboard is None else include_dashboard
                # "local": never join a cluster some other `ray start` recorded in /tmp/ray.
                context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                                   logging_level="ERROR",
                                   log_to_driver=False, configure_logging=True)
            else:
                context = ray.init(address=addr.ray_init_address, logging_level="ERROR", log_to_driver=False)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 -- ray raises ConnectionError, RuntimeError, ValueError…
            where = addr.source if addr else "--num-cpus" if num_cpus else FIELD
            raise ConfigError(where, f"ray.init failed ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}).",
                              "Check the address and that this machine runs the cluster's Ray and Python "
                              "versions (`ray --version`).") from None
    url = _dashboard_url(context)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    info = ClusterInfo(addr, nodes, available_per_node(), url, time.monotonic() - start, started)
    where = f"cluster at {addr.text}" if addr else "local Ray runtime"
    print(f"ray: {where}, {len(nodes)} node(s), {_format_resources(ray.cluster_resources())}"
          + (f"; dashboard {url}" if url else ""), file=out)
    return info


def _dashboard_available() -> bool:
    try:
        import aiohttp_cors  # noqa: F401 -- part of ray[default]
        import ray.dashboard  # noqa: F401
        return True
    except ImportError:
        return False


def _dashboard_url(context) -> str | None:
    url = getattr(context, "dashboard_url", None) if context is not None else None
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def available_per_node() -> dict:
    """Node id → currently available resources (best effort: {} when Ray hides it)."""
    try:
        from ray._private.state import available_resources_per_node as per_node

        return {k: dict(v) for k, v in per_node().items()}
    except Exception:  # noqa: BLE001
        return {}


# ---- does a trial fit? ------------------------------------------------------------------
@dataclass
class FitReport:
    fits: bool  # some set of alive nodes can hold the trial
    fits_now: bool  # … with the resources free right now
    bundles: list[dict] = field(default_factory=list)
    message: str = ""


def trial_bundles(resources: dict) -> tuple[list[dict], list[dict], str]:
    """(driver bundles, worker bundles, strategy) of one trial.

    ``resources``: ``workers`` (≥ 1), ``cpus_per_worker``, ``gpus_per_worker``, optional
    ``resources_per_worker`` ({name: amount}), ``accelerator_type`` (e.g. ``A100``;
    Ray's ``accelerator_type:A100`` node resource) and ``placement_strategy`` (Ray
    Train's, default ``PACK``). A single-worker trial trains in the Tune trial process
    (one bundle); a multi-worker trial is a 1-CPU Tune trial (the Train driver) plus one
    bundle per Ray Train worker.
    """
    workers = int(resources.get("workers", 1))
    per_worker = {"CPU": float(resources.get("cpus_per_worker", 1)),
                  "GPU": float(resources.get("gpus_per_worker", 0))}
    for name, amount in (resources.get("resources_per_worker") or {}).items():
        per_worker[str(name)] = float(amount)
    accelerator = resources.get("accelerator_type")
    if accelerator:
        per_worker[f"accelerator_type:{accelerator}"] = 0.001
    per_worker = {k: v for k, v in per_worker.items() if v > 0}
    strategy = str(resources.get("placement_strategy", "PACK")).upper()
    if strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError("resources.placement_strategy", f"unknown value {strategy!r}.",
                          f"Allowed values: {', '.join(PLACEMENT_STRATEGIES)}.")
    if workers == 1:
        return [per_worker], [], "PACK"
    return [{"CPU": 1.0}], [dict(per_worker) for _ in range(workers)], strategy


def _fits(bundle: dict, capacity: dict) -> bool:
    return all(capacity.get(k, 0.0) + _EPS >= v for k, v in bundle.items())


def _take(bundle: dict, capacity: dict) -> None:
    for k, v in bundle.items():
        capacity[k] = capacity.get(k, 0.0) - v


def _place(driver: list[dict], workers: list[dict], strategy: str, capacities: list[dict]) -> bool:
    """Whether the trial can be placed: the driver (its own placement group, one bundle)
    on any node that leaves room for the workers, the workers by the strategy (they are
    identical bundles, so greedy filling is exact for them)."""
    if not driver:
        return _place_workers(workers, strategy, [dict(c) for c in capacities])
    for i, node in enumerate(capacities):
        if _fits(driver[0], node):
            caps = [dict(c) for c in capacities]
            _take(driver[0], caps[i])
            if _place(driver[1:], workers, strategy, caps):
                return True
    return False


def _place_workers(workers: list[dict], strategy: str, caps: list[dict]) -> bool:
    if not workers:
        return True
    if strategy == "STRICT_PACK":
        total = {k: v * len(workers) for k, v in workers[0].items()}
        return any(_fits(total, c) for c in caps)
    if strategy == "STRICT_SPREAD":
        return sum(1 for c in caps if _fits(workers[0], c)) >= len(workers)
    placed = 0  # PACK and SPREAD are best effort: any nodes, several bundles per node
    for c in caps:
        while placed < len(workers) and _fits(workers[0], c):
            _take(workers[0], c)
            placed += 1
    return placed == len(workers)


def check_trial_fits(resources: dict, nodes: list[dict], available: dict | None = None, *,
                     field_prefix: str = "resources", out=None) -> FitReport:
    """Refuse a trial that no (set of) alive node(s) can ever hold; warn when it fits but
    the cluster is busy now (the trial waits). ``nodes``: ``ray.nodes()``; ``available``:
    node id → free resources (:func:`available_per_node`)."""
    out = out or sys.stderr
    alive = [n for n in nodes if n.get("Alive", True)]
    capacities = [dict(n.get("Resources", {})) for n in alive]
    driver, workers, strategy = trial_bundles(resources)
    bundles = driver + workers
    if _place(driver, workers, strategy, capacities):
        report = FitReport(True, True, bundles)
        if available:
            now = [dict(available.get(n.get("NodeID"), {})) for n in alive]
            if not _place(driver, workers, strategy, now):
                report.fits_now = False
                report.message = (f"a trial needs {_describe(driver, workers, strategy)}; the cluster has room "
                                  "for it but not free right now: trials wait until resources free up.")
                print(f"warning: {report.message}", file=out)
        return report
    field, problem = _culprit(resources, driver, workers, strategy, capacities)
    largest = max(capacities, key=lambda c: (c.get("GPU", 0), c.get("CPU", 0)), default={})
    raise ConfigError(f"{field_prefix}.{field}", f"{problem} A trial needs {_describe(driver, workers, strategy)}; "
                      f"the cluster has {len(alive)} alive node(s), the largest with {_format_resources(largest)}.",
                      "Change the field, or add nodes with those resources (autoscaling clusters: the node type "
                      "must exist in the cluster config).")


def _culprit(resources, driver, workers, strategy, capacities) -> tuple[str, str]:
    worker = (workers or driver)[0]
    names = {"CPU": "cpus_per_worker", "GPU": "gpus_per_worker"}
    for key, amount in worker.items():
        if not any(c.get(key, 0.0) + _EPS >= amount for c in capacities):
            if key.startswith("accelerator_type:"):
                return "accelerator_type", (f"no node has accelerator type {key.split(':', 1)[1]!r} "
                                            f"(nodes have: {_accelerators(capacities) or 'none'}).")
            name = names.get(key, f"resources_per_worker.{key}")
            best = max((c.get(key, 0.0) for c in capacities), default=0.0)
            return name, f"{_num(amount)} {key} per worker is more than any node has (at most {_num(best)})."
    if workers and strategy == "STRICT_PACK":
        return "workers", f"{len(workers)} workers must share one node (STRICT_PACK) and no node holds them all."
    if workers and strategy == "STRICT_SPREAD":
        return "workers", f"{len(workers)} workers need as many distinct nodes (STRICT_SPREAD)."
    return "workers", f"{len(workers)} workers do not fit on the whole cluster at once."


def _describe(driver, workers, strategy) -> str:
    if not workers:
        return _format_resources(driver[0])
    return f"{len(workers)} × {{{_format_resources(workers[0])}}} ({strategy}) plus 1 CPU for its Train driver"


def _accelerators(capacities) -> str:
    return ", ".join(sorted({k.split(":", 1)[1] for c in capacities for k in c if k.startswith("accelerator_type:")}))


def _num(x: float) -> str:
    return f"{x:g}"


def _format_resources(resources: dict) -> str:
    keys = [k for k in ("CPU", "GPU") if k in resources] + sorted(
        k for k in resources if k not in ("CPU", "GPU") and not k.startswith(("node:", "memory",
                                                                            "object_store_memory")))
    return ", ".join(f"{k}={_num(resources[k])}" for k in keys if not math.isclose(resources[k], 0.0)) or "nothing"


# ---- is the MLflow store reachable from every node? -------------------------------------
def check_store_for_cluster(tracking_uri: str, nodes: list[dict], storage=None, *,
                            field: str = "--tracking-uri") -> None:
    """A store the trials of a multi-node cluster can all reach.

    A SQLite file with more than one alive node is refused unless it lies on the shared
    ``storage`` folder (an NFS mount every node sees); a loopback tracking server
    (``http://127.0.0.1``) is refused when the nodes are on different hosts.
    """
    alive = [n for n in nodes if n.get("Alive", True)]
    fix = ("Run `mlflow server --backend-store-uri sqlite:////shared/mlflow.db --default-artifact-root "
           "s3://BUCKET/mlflow --host 0.0.0.0 --port 5000` on the head (or use PostgreSQL) and pass "
           "--tracking-uri http://HEAD:5000.")
    parsed = urlparse(tracking_uri)
    scheme = parsed.scheme.lower()
    if len(alive) > 1 and (scheme == "sqlite" or scheme in ("", "file")):
        path = tracking_uri[len("sqlite:///"):] if scheme == "sqlite" else (parsed.path or tracking_uri)
        if storage is not None and not storage.is_remote and storage.contains(path):
            return
        kind = "a SQLite file" if scheme == "sqlite" else "a local file store"
        raise ConfigError(field, f"{tracking_uri!r} is {kind} on this machine, but the cluster has {len(alive)} "
                          "nodes whose trials must all write to it (SQLite over a network also corrupts under "
                          "concurrent writers).", fix)
    ips = {n.get("NodeManagerAddress") for n in alive} - {None, ""}
    if scheme in ("http", "https") and len(ips) > 1:
        host = parsed.hostname or ""
        if host in ("localhost", "::1") or host.startswith("127."):
            raise ConfigError(field, f"{tracking_uri!r} is a loopback address, but the cluster's nodes are on "
                              f"{len(ips)} hosts ({', '.join(sorted(ips))}); trials elsewhere cannot reach it.",
                              "Start the server with --host 0.0.0.0 and pass --tracking-uri http://HEAD-IP:PORT.")


def check_storage_for_cluster(storage, nodes: list[dict], *, field: str = "--storage", out=None) -> None:
    """Warn when a local storage folder serves nodes on several hosts (it must be shared)."""
    out = out or sys.stderr
    ips = {n.get("NodeManagerAddress") for n in nodes if n.get("Alive", True)} - {None, ""}
    if storage is not None and not storage.is_remote and len(ips) > 1:
        print(f"warning: {field} {storage.display} is a local folder and the cluster spans {len(ips)} hosts: "
              "it must be mounted at the same path on every node (NFS), else use s3://… .", file=out)


# ---- all of it, in order ----------------------------------------------------------------
def before_sweep(address: str | None, *, resources: dict, tracking_uri: str, storage=None,
                 num_cpus: int | None = None, timeout: float = 5.0, out=None, err=None) -> ClusterInfo:
    """Every check a sweep needs before it creates MLflow state: the storage's form and
    reachability, the Ray connection (bounded), the trial's fit, the store's reach.
    Leaves Ray connected on success; shuts a connection it made down on failure."""
    import ray

    from alwa_sweep.storage import check_storage_writable

    if storage is not None:
        check_storage_writable(storage)
    was_connected = ray.is_initialized()
    # A local runtime starts the dashboard only for multi-worker trials: it is what frees
    # a killed Train driver's placement group (RAY_MLFLOW_NOTES), and it costs startup time.
    dashboard = int(resources.get("workers", 1)) > 1 and _dashboard_available()
    info = connect(address, num_cpus=num_cpus, timeout=timeout, include_dashboard=dashboard, out=out)
    try:
        check_trial_fits(resources, info.nodes, info.available, out=err)
        check_store_for_cluster(tracking_uri, info.nodes, storage)
        check_storage_for_cluster(storage, info.nodes, out=err)
    except ConfigError:
        if not was_connected:
            ray.shutdown()
        raise
    return info

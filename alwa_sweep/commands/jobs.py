"""Sweeps as Ray Jobs: ``alwa-sweep run … --submit``, ``alwa-sweep status``, ``alwa-sweep logs``.

``--submit`` sends the sweep's driver to the cluster (``ray.job_submission``) and
returns at once; the driver then runs on the head node, so closing the laptop does not
end the sweep. Its ``runtime_env`` carries this package's code (``py_modules``) and the
spec (``working_dir``), so worker nodes need only Ray (and, unless the image has them
— see ``Dockerfile`` — the dependencies, installed per node from ``pip`` by Ray and
cached). Secrets are never put in the runtime env (the dashboard shows it): nodes get
AWS credentials from their instance role or their own environment; only the
non-secret ``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL[_S3]`` and region are passed.

Job ids are ``alwa-<sweep name>`` so ``status``/``logs`` find a sweep by its name.

Registered in ``alwa_sweep/commands/__init__.py`` as (``status``, ``jobs_status``) and
(``logs``, ``jobs_logs``): two thin modules exposing :func:`add_status_arguments` /
:func:`status` and :func:`add_logs_arguments` / :func:`logs` from here.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import alwa_sweep
from trainers.errors import ConfigError

JOB_PREFIX = "alwa-"
PACKAGES = ("alwa_sweep", "trainers", "reports", "search_spaces")
PASSED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def dashboard_address(address: str | None, field: str = "--address") -> str:
    """The Jobs API address: ``--address`` or ``RAY_ADDRESS``, an ``http(s)://host:port``
    (the dashboard, 8265 by default); a bare ``host`` or ``host:port`` gets ``http://``."""
    text = address or os.environ.get("RAY_ADDRESS")
    if not text:
        raise ConfigError(field, "--submit needs the cluster's dashboard address.",
                          "Pass --address http://HEAD:8265 (or set RAY_ADDRESS to it); "
                          "`ray up` prints it, `ray dashboard cluster.yaml` forwards it to localhost.")
    if text.startswith("ray://"):
        raise ConfigError(field, f"{text!r} is a Ray Client address; jobs go to the dashboard.",
                          "Use --address http://HEAD:8265.")
    parsed = urlparse(text if "://" in text else f"http://{text}")
    try:
        port = parsed.port or 8265
    except ValueError:
        port = None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port is None:
        raise ConfigError(field, f"{text!r} is not a dashboard address of the form http://host:port.",
                          "Use --address http://HEAD:8265.")
    return f"{parsed.scheme}://{parsed.hostname}:{port}"


def job_client(address: str | None, field: str = "--address", timeout: float = 5.0):
    """A ``JobSubmissionClient``; an unreachable or non-Ray dashboard is a ConfigError in seconds."""
    url = dashboard_address(address, field)
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(field, f"cannot reach the Ray dashboard at {url} ({exc.strerror or exc}).",
                          "Check that the head runs with the dashboard (ray[default] installed; `ray status` "
                          "there) and that port is open or forwarded (`ray dashboard cluster.yaml`).") from None
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # noqa: BLE001 -- ConnectionError, ValueError, requests errors
        raise ConfigError(field, f"{url} did not answer as a Ray dashboard ({' '.join(str(exc).split())[:300]}).",
                          "Give the dashboard's address (port 8265 by default), not the GCS port.") from None


def pip_requirements() -> list[str]:
    """This package's runtime requirements except Ray (already on every node)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("alwa-sweep") or []
    except PackageNotFoundError:
        return []
    keep = []
    for req in reqs:
        if "extra ==" in req:
            continue
        name = req.split(";")[0].strip()
        if name.lower().startswith("ray"):
            continue
        keep.append(name)
    return keep


def build_runtime_env(spec_path: Path, install: str = "pip", env=None) -> tuple[dict, Path]:
    """(runtime_env, staging folder): the spec in ``working_dir``, the code as
    ``py_modules``, the requirements as ``pip`` (``install="pip"``) or none (``"image"``:
    the nodes' image has them)."""
    env = os.environ if env is None else env
    staging = Path(tempfile.mkdtemp(prefix="alwa_job_"))
    shutil.copy2(spec_path, staging / "spec.yaml")
    root = Path(alwa_sweep.__file__).resolve().parent.parent
    modules = [str(root / p) for p in PACKAGES if (root / p).is_dir()]
    runtime_env = {"working_dir": str(staging), "py_modules": modules,
                   "env_vars": {k: env[k] for k in PASSED_ENV if env.get(k)}}
    if install == "pip":
        runtime_env["pip"] = pip_requirements()
    elif install != "image":
        raise ConfigError("--runtime-env", f"unknown value {install!r}.", "Allowed values: image, pip.")
    return runtime_env, staging


def driver_arguments(args, name: str) -> list[str]:
    """The ``run`` arguments of the driver on the cluster, rebuilt from the parsed ones:
    without --submit/--address/--num-cpus (it joins the cluster with ``auto``), the spec
    as shipped in the working dir, and a runs folder that outlives the job's working dir."""
    command = ["spec.yaml", "--name", name]
    for flag, value in (("--tracking-uri", args.tracking_uri), ("--max-concurrent", args.max_concurrent),
                        ("--storage", getattr(args, "storage", None)), ("--runs-dir", args.runs_dir)):
        if value is not None:
            command += [flag, str(value)]
    for override in args.overrides:
        command += ["--set", override]
    for flag, on in (("--no-check-paths", args.no_check_paths), ("--quiet", True)):
        if on:
            command.append(flag)
    return command


def submit(address: str | None, command: list[str], job_id: str, spec_path: Path, *, install: str = "pip",
           out=None) -> str:
    """Submit ``python -m alwa_sweep <command…>`` as a Ray Job; its id."""
    out = out or sys.stdout
    client = job_client(address)
    runtime_env, staging = build_runtime_env(spec_path, install)
    entrypoint = " ".join(shlex.quote(a) for a in ["python", "-m", "alwa_sweep", *command])
    if command and command[0] == "run" and "--runs-dir" not in command:
        entrypoint += ' --runs-dir "$HOME/alwa_runs"'  # the job's working dir is temporary
    try:
        job = client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
                                metadata={"alwa.sweep": job_id[len(JOB_PREFIX):]})
    except Exception as exc:  # noqa: BLE001 -- RuntimeError from the API: duplicate id, bad runtime env
        text = " ".join(str(exc).split())
        hint = ("A job of that name exists: pick another --name, or see `alwa-sweep status`."
                if "already exists" in text else "See the dashboard's Jobs page.")
        raise ConfigError("--submit", f"the cluster refused the job ({text[:300]}).", hint) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"submitted job {job} to {client.get_address()}\n"
          f"  follow it: alwa-sweep logs {job} --follow --address {client.get_address()}\n"
          f"  state:     alwa-sweep status {job} --address {client.get_address()}", file=out)
    return job


def submit_run(args, name: str) -> int:
    """``alwa-sweep run SPEC … --submit``: the same sweep, run by a driver on the cluster."""
    if args.num_cpus is not None:
        raise ConfigError("--num-cpus", "applies to a local runtime, not to a submitted sweep.",
                          "Leave it out with --submit; the cluster's nodes set their CPUs.")
    submit(args.address, ["run", *driver_arguments(args, name)], f"{JOB_PREFIX}{name}", Path(args.spec),
           install=getattr(args, "runtime_env", None) or "pip")
    return 0


# ---- status / logs ----------------------------------------------------------------------
def _job_id(text: str) -> str:
    return text if text.startswith(JOB_PREFIX) or text.startswith("raysubmit_") else f"{JOB_PREFIX}{text}"


def add_status_arguments(parser) -> None:
    parser.add_argument("job", nargs="?", help="a sweep name or job id (default: every alwa-sweep job)")
    parser.add_argument("--address", help="the dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")


def status(args, out=None) -> int:
    out = out or sys.stdout
    client = job_client(args.address)
    if args.job:
        job = _job_id(args.job)
        try:
            info = client.get_job_info(job)
        except Exception:  # noqa: BLE001 -- RuntimeError: 404
            raise ConfigError("JOB", f"no job {job!r} on {client.get_address()}.",
                              "List them with `alwa-sweep status`.") from None
        jobs = [info]
    else:
        jobs = [j for j in client.list_jobs() if (j.submission_id or "").startswith(JOB_PREFIX)]
    if not jobs:
        print("no alwa-sweep jobs", file=out)
    for info in sorted(jobs, key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000)) if info.start_time else "-"
        message = f"  {info.message}" if info.message and args.job else ""
        print(f"{info.submission_id}  {info.status.value if hasattr(info.status, 'value') else info.status}"
              f"  started {started}{message}", file=out)
    return 0


def add_logs_arguments(parser) -> None:
    parser.add_argument("job", help="a sweep name or job id")
    parser.add_argument("--address", help="the dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")


def logs(args, out=None) -> int:
    out = out or sys.stdout
    client = job_client(args.address)
    job = _job_id(args.job)
    try:
        client.get_job_status(job)
    except Exception:  # noqa: BLE001
        raise ConfigError("JOB", f"no job {job!r} on {client.get_address()}.",
                          "List them with `alwa-sweep status`.") from None
    if not args.follow:
        out.write(client.get_job_logs(job))
        return 0
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(job):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return 0

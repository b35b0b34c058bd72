"""Where a sweep's Ray state lives: ``--storage`` (a local folder or a remote URI).

Ray Tune's experiment state, every trial's checkpoints and Ray Train's runs are written
to one *storage*: a local folder (made absolute; on a multi-node cluster it must be a
folder every node mounts, e.g. NFS) or any URI Ray's storage accepts (``s3://``,
``gs://``, ``abfs://``, ``hdfs://``…). A URI never becomes a local folder (``s3://b/x``
is not ``./s3:/b/x``).

S3 and S3-compatible stores (MinIO, Ceph, moto) take the standard AWS variables:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` or a profile or
an instance role (resolved by pyarrow's credential chain, never copied into the
filesystem object, so no secret is pickled into Tune's experiment state), region from
``AWS_REGION``/``AWS_DEFAULT_REGION``, and the endpoint from ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``. pyarrow's ``S3FileSystem()`` does not read the endpoint variables
by itself (checked with pyarrow 25: only ``FileSystem.from_uri`` does, and older
versions not even that), so :func:`resolve_storage` builds the filesystem with
``endpoint_override`` from them.

The API: :func:`resolve_storage` → :class:`Storage`; ``Storage.path`` and
``Storage.filesystem`` go to ``tune.RunConfig(storage_path=…, storage_filesystem=…)``
and to ``ray.train.RunConfig`` the same way; :meth:`Storage.join` gives a sub-location.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from trainers.errors import ConfigError

FIELD = "--storage"
# Schemes Ray's storage layer (pyarrow, or fsspec through pyarrow) reaches.
REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class Storage:
    """A resolved storage location.

    ``path``: what Tune/Train take as ``storage_path`` (an absolute folder, or for S3
    ``bucket/prefix`` since the filesystem is given, or the full URI when
    ``filesystem`` is None and Ray resolves the scheme itself).
    ``filesystem``: a ``pyarrow.fs.FileSystem`` or None. ``is_remote``: not a local
    folder. ``display``: what to show the user (the URI as given, or the folder).
    """

    path: str
    filesystem: object | None
    is_remote: bool
    display: str
    scheme: str = field(default="file")

    def join(self, *parts: str) -> "Storage":
        if self.is_remote:
            path = posixpath.join(self.path, *parts)
            display = posixpath.join(self.display, *parts)
        else:
            path = str(Path(self.path, *parts))
            display = path
        return Storage(path, self.filesystem, self.is_remote, display, self.scheme)

    def contains(self, local_path: str | Path) -> bool:
        """Whether a local file lies inside this (local) storage folder."""
        if self.is_remote:
            return False
        try:
            Path(local_path).resolve().relative_to(Path(self.path))
            return True
        except ValueError:
            return False

    def run_config_kwargs(self) -> dict:
        """``storage_path``/``storage_filesystem`` for ``tune.RunConfig``/``ray.train.RunConfig``."""
        kwargs = {"storage_path": self.path}
        if self.filesystem is not None:
            kwargs["storage_filesystem"] = self.filesystem
        return kwargs


def s3_endpoint(env=None) -> str | None:
    """The S3 endpoint from the standard variables (service-specific one first)."""
    env = os.environ if env is None else env
    return env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(env=None, *, connect_timeout: float = 5.0, request_timeout: float = 30.0,
                  max_attempts: int = 3):
    """A ``pyarrow.fs.S3FileSystem`` honouring ``AWS_ENDPOINT_URL[_S3]`` and the region
    variables; credentials are left to pyarrow's default chain (nothing secret held)."""
    import pyarrow.fs as pafs

    env = os.environ if env is None else env
    kwargs = {"connect_timeout": connect_timeout, "request_timeout": request_timeout,
              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)}
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    endpoint = s3_endpoint(env)
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError("AWS_ENDPOINT_URL", f"{endpoint!r} is not an http(s)://host[:port] URL.",
                              "Set it to the S3 endpoint, e.g. http://minio.local:9000, or unset it for AWS.")
        kwargs["endpoint_override"] = f"{parsed.scheme}://{parsed.netloc}"
        kwargs["scheme"] = parsed.scheme
    return pafs.S3FileSystem(**kwargs)


def resolve_storage(uri: str | os.PathLike | None, default: str | os.PathLike | None = None,
                    *, field: str = FIELD, env=None) -> Storage:
    """Parse and check ``--storage`` (nothing is created or contacted here).

    ``None`` means ``default`` (a local folder, usually the sweep folder). Raises
    :class:`ConfigError` naming ``field`` with the fix for a malformed value.
    """
    if uri is None or str(uri).strip() == "":
        if default is None:
            raise ConfigError(field, "no storage given.", "Pass a folder or a URI such as s3://bucket/prefix.")
        uri = default
    text = str(uri).strip()
    if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:/(?!/)", text):  # "s3:/bucket": one slash lost
        scheme = text.split(":", 1)[0]
        raise ConfigError(field, f"{text!r} has a single slash after '{scheme}:'.",
                          f"Write {scheme}://{text.split(':/', 1)[1]}.")
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        local = parsed.path if scheme == "file" else text
        if scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ConfigError(field, f"{text!r} names host {parsed.netloc!r}; file:// URIs are local.",
                              "Write file:///absolute/path, or a plain folder.")
        folder = Path(local).expanduser().resolve()
        return Storage(str(folder), None, False, str(folder), "file")
    if scheme not in REMOTE_SCHEMES:
        allowed = ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
        raise ConfigError(field, f"unknown storage scheme {scheme!r} in {text!r}.",
                          f"Give a local folder or a URI with one of: {allowed}.")
    bucket = parsed.netloc
    if not bucket:
        raise ConfigError(field, f"{text!r} names no bucket.", f"Write {scheme}://BUCKET/PREFIX.")
    prefix = parsed.path.strip("/")
    if parsed.query or parsed.fragment:
        raise ConfigError(field, f"{text!r} has a query or fragment ('?…', '#…').",
                          "Configure the endpoint with AWS_ENDPOINT_URL and give just scheme://bucket/prefix.")
    display = f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")
    if scheme == "s3":
        if not _BUCKET.fullmatch(bucket):
            raise ConfigError(field, f"{bucket!r} is not a valid S3 bucket name.",
                              "Bucket names are 3-63 lower-case letters, digits, '.' or '-'.")
        path = f"{bucket}/{prefix}" if prefix else bucket
        return Storage(path, s3_filesystem(env), True, display, "s3")
    return Storage(display, None, True, display, scheme)


def sweep_storage(uri: str | None, sweep_name: str, sweep_dir: str | os.PathLike) -> Storage:
    """Where a sweep's Tune state (``tune/``), checkpoints and Train runs (``train/``)
    go: the ``--storage`` URI joined with the sweep's name, else the sweep folder."""
    if not uri:
        return resolve_storage(None, default=sweep_dir)
    return resolve_storage(uri).join(sweep_name)


def check_storage_writable(storage: Storage, *, field: str = FIELD) -> None:
    """Write and delete one small object (a remote store) or file (a folder); fail fast.

    Run before any MLflow state is created: a missing bucket, wrong credentials or an
    unreachable endpoint is a ConfigError, not a failure at the first checkpoint.
    """
    if not storage.is_remote:
        from alwa_sweep.sweep_paths import check_writable

        check_writable(Path(storage.path), field)
        return
    import pyarrow.fs as pafs

    fs = storage.filesystem
    path = storage.path
    if fs is None:
        try:
            fs, path = pafs.FileSystem.from_uri(storage.path)
        except Exception as exc:  # noqa: BLE001 -- pyarrow raises several kinds
            raise ConfigError(field, f"cannot open {storage.display} ({_one_line(exc)}).",
                              "Install the filesystem's client (e.g. gcsfs) and check the URI.") from None
    bucket = path.split("/", 1)[0]
    marker = posixpath.join(path, f".alwa_write_test_{uuid.uuid4().hex[:8]}")
    try:
        info = fs.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(field, f"bucket {bucket!r} of {storage.display} does not exist.",
                              "Create it (e.g. `aws s3 mb s3://" + bucket + "`) or fix the name.")
        with fs.open_output_stream(marker) as stream:
            stream.write(b"ok")
        fs.delete_file(marker)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        hint = ("Check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the instance role), AWS_ENDPOINT_URL "
                f"({s3_endpoint() or 'unset: AWS'}) and the region.") if storage.scheme == "s3" else \
            "Check the credentials and that the location is writable."
        raise ConfigError(field, f"cannot write to {storage.display} ({_one_line(exc)}).", hint) from None


def _one_line(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text[:limit] + ("…" if len(text) > limit else "")


def list_files(storage: Storage) -> list[str]:
    """Every file under the storage location, relative to it (for checks and tests)."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem, storage.path
    if fs is None:
        if storage.is_remote:
            fs, path = pafs.FileSystem.from_uri(storage.path)
        else:
            fs = pafs.LocalFileSystem()
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(posixpath.relpath(i.path, path) for i in infos if i.type == pafs.FileType.File)

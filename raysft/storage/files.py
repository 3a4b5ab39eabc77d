"""Read and write a run directory's files wherever it lives: a local path or ``s3://bucket/prefix``.

Ray Train itself stores checkpoints through ``pyarrow.fs``; using the same layer here means S3
endpoint, region and credentials come from the same environment variables (``AWS_*``) and never
from the config. Every call here is retried through a storage outage (``retry.py``).
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

import boto3
import pyarrow.fs as pafs
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import ClientError

from raysft.config.secrets import SECRET_ENV
from raysft.storage import checksums
from raysft.storage.retry import one_sdk_attempt, retrying


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


# NOTE: one attempt per SDK call. storage/retry.py retries transient errors (5xx and throttling too)
# until storage.retry_timeout_s and checks that deadline between attempts; the SDKs' own retries
# (botocore: 4 more with backoff) ran inside one attempt and held an upload ~10 s past the deadline.
SDK_RETRIES = {"mode": "standard", "max_attempts": 1}


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). S3 honours ``AWS_ENDPOINT_URL`` for S3-compatible servers."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    if uri.startswith("s3://"):
        one_attempt = one_sdk_attempt()  # see SDK_RETRIES
        if endpoint := os.environ.get("AWS_ENDPOINT_URL"):
            fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="https" if endpoint.startswith("https") else "http",
                                   region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                                   access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                                   secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"), retry_strategy=one_attempt)
        else:
            # AWS itself: the SDK's default credential chain (environment, ~/.aws, instance role), as
            # FileSystem.from_uri has; unlike it, one attempt per call and the bucket's region looked up once.
            fs = pafs.S3FileSystem(region=s3_region(uri[len("s3://"):].split("/", 1)[0]), retry_strategy=one_attempt)
        return fs, uri[len("s3://"):]
    return pafs.FileSystem.from_uri(uri)


@functools.lru_cache(maxsize=64)
def s3_region(bucket: str) -> str:
    """The bucket's own region, looked up once per process (from_uri looked it up for every file,
    outside the retries: during an outage each call failed at once); ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION`` when the lookup cannot answer (e.g. a VPC endpoint only)."""
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        if region := os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
            return region
        raise


# Environment forwarded from the launching process to Ray Train workers at run time (endpoints,
# regions, projects for storage and trackers), through the workers' runtime_env.
# NOTE: never a credential (SECRET_ENV: keys, tokens): Ray writes a runtime_env verbatim to
# runtime_env_agent.log on every node and into Ray Train's run state. Workers of a local Ray
# started by the run inherit the driver's environment; on a cluster credentials come from the
# job's runtime_env or the nodes (README "Credentials on a cluster").
FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "HF_", "WANDB_", "TRACKIO_")


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and not SECRET_ENV.search(k)}


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def write_bytes(uri: str, data: bytes, *, timeout_s: float | None = None) -> None:
    """Write a whole object, never half of it (an object store publishes an upload only complete; a
    local file is written aside and renamed); retried as a whole, for ``timeout_s``, default
    ``storage.retry_timeout_s``."""
    fs, path = filesystem(uri)
    local = isinstance(fs, pafs.LocalFileSystem)

    def put() -> None:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        target = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}" if local else path
        with fs.open_output_stream(target) as f:
            f.write(data)
        if local:
            os.replace(target, path)

    retrying(f"write {uri}", put, timeout_s=timeout_s)


def write_verified(uri: str, data: bytes) -> str:
    """``write_bytes`` that returns the data's checksum; on S3 the upload carries it, so S3 refuses
    bytes that did not arrive intact and keeps the checksum for ``checksums.stored``."""
    crc = checksums.of_bytes(data)
    if not uri.startswith("s3://"):
        write_bytes(uri, data)
        return crc
    bucket, _, key = uri[len("s3://"):].partition("/")
    client = s3_client()
    retrying(f"write {uri}", lambda: client.put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm="CRC32",
                                                       ChecksumCRC32=checksums.to_s3(crc)))
    return crc


def s3_client(max_pool_connections: int = 24):
    """A boto3 S3 client with the same endpoint and credential chain as the pyarrow filesystem (AWS_*),
    one SDK attempt per call (SDK_RETRIES). NOTE: boto3 where pyarrow has no equivalent: uploads with
    checksums, conditional writes, HEAD with checksums."""
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                        config=Config(max_pool_connections=max_pool_connections, retries=SDK_RETRIES))


def s3_head(bucket: str, key: str) -> dict | None:
    """HeadObject with the stored checksum (``ChecksumMode=ENABLED``); None when there is no such object."""
    client = s3_client(4)

    def head() -> dict | None:
        try:
            return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    return retrying(f"stat s3://{bucket}/{key}", head)


def s3_stream_crc32(bucket: str, key: str) -> str:
    """The CRC32 of an object's bytes, read through once (for objects S3 holds no whole-object CRC32 for)."""
    client = s3_client(4)

    def read() -> str:
        crc = 0
        for chunk in client.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(8 << 20):
            crc = zlib.crc32(chunk, crc)
        return f"{crc:08x}"

    return retrying(f"read s3://{bucket}/{key}", read)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)

    def get() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return retrying(f"read {uri}", get)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return retrying(f"stat {uri}", lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def list_dir(uri: str, *, recursive: bool = False) -> list[pafs.FileInfo]:
    """The entries under ``uri`` (none if it does not exist)."""
    fs, path = filesystem(uri)
    return retrying(f"list {uri}", lambda: fs.get_file_info(pafs.FileSelector(path, recursive=recursive,
                                                                               allow_not_found=True)))


def delete_file(uri: str) -> None:
    fs, path = filesystem(uri)
    retrying(f"delete {uri}", lambda: fs.delete_file(path))


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    retrying(f"delete {uri}", lambda: fs.delete_dir(path))


# pyarrow's copy_files moves 1 MB per request by default; against S3 that is one ranged GET per MB
# (measured on moto's server: 100 MB in 8.4 s, vs 0.55 s with 64 MB chunks and 1.1 s for boto3).
# Ray Train uses 64 MB for the same reason.
CHUNK = 64 << 20


# Written after every other file of a folder: a checkpoint's manifests and state name what is in it.
LAST = re.compile(r"^raysft_(manifest_rank\d+|state)\.json$")


class UploadStopped(Exception):
    """``upload_dir`` stopped because its ``stop()`` said so; what was sent has no manifest (incomplete)."""


def _never() -> bool:
    return False


def upload_dir(local_dir: str | Path, uri: str, *, stop: Callable[[], bool] = _never,
               known: dict[str, str] | None = None) -> None:
    """Copy a local directory tree to ``uri`` (local or remote), its manifests last, each file
    retried through a storage outage. ``stop()`` is asked between files (and while S3 parts are in
    flight): True ends the upload with ``UploadStopped``, before any manifest is sent. On S3 every
    file goes with its CRC32 (``known``: relative path -> checksum already computed, e.g. a manifest's;
    the others are computed here), which S3 verifies on receipt."""
    if uri.startswith("s3://"):
        return _upload_dir_s3(Path(local_dir), uri, stop, known or {})
    fs, path = filesystem(uri)
    local = Path(local_dir)
    retrying(f"mkdir {uri}", lambda: fs.create_dir(path, recursive=True))
    found = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (bool(LAST.match(p.name)), str(p)))
    for p in found:
        if stop():
            raise UploadStopped(uri)
        dest = f"{path}/{p.relative_to(local).as_posix()}"

        def copy(p=p, dest=dest) -> None:
            fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(p), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                            chunk_size=CHUNK, use_threads=False)

        retrying(f"upload {p.name} to {uri}", copy)


def _upload_dir_s3(local_dir: Path, uri: str, stop: Callable[[], bool], known: dict[str, str]) -> None:
    """S3 uploads through s3transfer, as ``aws s3 cp --recursive`` does: multipart, several parts in flight.

    NOTE: not pyarrow: its S3 uploads must run single-threaded (see upload_dir), which measured 2.5x
    slower than this on a 1.2 GB checkpoint (bench/checkpoint.py). Same credentials chain (AWS_*)."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    client = s3_client()
    config = TransferConfig(max_concurrency=20)  # 8 MB parts (s3transfer default), 20 in flight
    found = [p for p in sorted(local_dir.rglob("*")) if p.is_file()]
    crcs = {p: known.get(p.relative_to(local_dir).as_posix()) or checksums.of_file(p) for p in found}

    def key(p: Path) -> str:
        return "/".join(x for x in (prefix.rstrip("/"), p.relative_to(local_dir).as_posix()) if x)

    with create_transfer_manager(client, config) as manager:
        for batch in ([p for p in found if not LAST.match(p.name)], [p for p in found if LAST.match(p.name)]):
            if batch:
                what = f"upload {batch[0].name} to {uri}" if len(batch) == 1 else f"upload {len(batch)} files to {uri}"
                retrying(what, _all_sent(manager, batch, bucket, key, stop, crcs))
            # (leaving the manager's block on UploadStopped cancels the transfers still in flight)


def _all_sent(manager, batch: list[Path], bucket: str, key: Callable[[Path], str], stop: Callable[[], bool],
              crcs: dict[Path, str]):
    """A callable that sends every file of ``batch`` in parallel and, on each later call (each retry),
    sends again, together, only those whose transfer failed; it raises the first failure, and
    ``UploadStopped`` as soon as ``stop()``. One retry loop for the batch: after an outage the failed
    files go out in parallel again, not one by one, with one warning and one "storage is back"."""
    pending = list(batch)

    def attempt() -> None:
        futures = {p: manager.upload(str(p), bucket, key(p), extra_args=checksums.s3_upload_args(crcs[p])) for p in pending}
        while not all(f.done() for f in futures.values()):
            if stop():
                raise UploadStopped(key(pending[0]))
            time.sleep(0.05)
        errors = []
        for p, f in futures.items():
            try:
                f.result()
                pending.remove(p)
            except Exception as e:  # noqa: BLE001 - the retry loop classifies the first one
                errors.append(e)
        if errors:
            raise errors[0]

    return attempt


def download_dir(uri: str, local_dir: str | Path | None = None) -> Path:
    if not is_remote(uri):
        return Path(filesystem(uri)[1])
    local = Path(local_dir or tempfile.mkdtemp(prefix="raysft-"))
    local.mkdir(parents=True, exist_ok=True)  # pyarrow's copy_files does not create the destination
    fs, path = filesystem(uri)
    retrying(f"download {uri}", lambda: pafs.copy_files(path, str(local), source_filesystem=fs,
                                                        destination_filesystem=pafs.LocalFileSystem(), chunk_size=CHUNK))
    return local

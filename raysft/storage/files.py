"""Read and write a run directory's files wherever it lives: a local path or ``s3://bucket/prefix``.

Ray Train itself stores checkpoints through ``pyarrow.fs``; using the same layer here means S3
endpoint, region and credentials come from the same environment variables (``AWS_*``) and never
from the config.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). S3 honours ``AWS_ENDPOINT_URL`` for S3-compatible servers."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    if uri.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        endpoint = os.environ["AWS_ENDPOINT_URL"]
        fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="https" if endpoint.startswith("https") else "http",
                               region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                               access_key=os.environ.get("AWS_ACCESS_KEY_ID"), secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"))
        return fs, uri[len("s3://"):]
    return pafs.FileSystem.from_uri(uri)


# Environment forwarded from the launching process to Ray Train workers at run time (credentials
# and endpoints for storage and trackers). Never written into a config or a run directory.
FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "HF_", "WANDB_", "TRACKIO_")


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (local or remote)."""
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local_dir: str | Path | None = None) -> Path:
    if not is_remote(uri):
        return Path(filesystem(uri)[1])
    local = Path(local_dir or tempfile.mkdtemp(prefix="raysft-"))
    local.mkdir(parents=True, exist_ok=True)  # pyarrow's copy_files does not create the destination
    fs, path = filesystem(uri)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local

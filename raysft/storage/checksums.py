"""Content checksums: the CRC32 of every file a checkpoint or a prepared set holds, in its manifest,
checked against storage without downloading and against the bytes after every download.

Why CRC32: it is what S3 computes itself. An upload carries it (``ChecksumCRC32``, with
``ChecksumType=FULL_OBJECT`` for multipart uploads), so S3 verifies each object on receipt and
answers ``HeadObject(ChecksumMode=ENABLED)`` with the same value: a checkpoint in S3 is checked by
one HEAD per file, no download. It is in the standard library (zlib) and fast: 3.8 GB/s on one core
here, against 1.3 GB/s for SHA-256 (bench/checksum.py). It catches accidental corruption (flipped
bits, a truncated or mixed-up copy), which is the threat to a checkpoint; not deliberate tampering.
"""

from __future__ import annotations

import base64
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ALGORITHM = "crc32"
_CHUNK = 8 << 20


def of_bytes(data: bytes) -> str:
    """The checksum as manifests hold it: 8 hex digits."""
    return f"{zlib.crc32(data):08x}"


def of_file(path: str | Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def to_s3(hex_crc: str) -> str:
    """S3's spelling of the same value: base64 of the 4 big-endian bytes."""
    return base64.b64encode(int(hex_crc, 16).to_bytes(4, "big")).decode()


def from_s3(b64: str) -> str:
    return base64.b64decode(b64).hex()


def s3_upload_args(hex_crc: str) -> dict[str, str]:
    """``extra_args`` for an s3transfer upload that S3 verifies on receipt, stored as a whole-object CRC32
    (s3transfer sends ``ChecksumType`` with multipart uploads only)."""
    return {"ChecksumAlgorithm": "CRC32", "ChecksumType": "FULL_OBJECT", "ChecksumCRC32": to_s3(hex_crc)}


@dataclass(frozen=True)
class Mismatch:
    """A file whose checksum in storage is not the one its manifest recorded."""

    file: str
    expected: str
    found: str  # the checksum found, or "missing"

    def __str__(self) -> str:
        return f"{self.file} has {ALGORITHM} {self.found}, its manifest says {self.expected}"


def stored(uri: str) -> str | None:
    """The checksum of the object at ``uri`` as storage holds it now; None when it is not there.
    S3: the CRC32 S3 verified on upload (one HEAD), else (an object uploaded without one, or as a
    composite of parts) its bytes read through once; local: the file's bytes."""
    from raysft.storage import files  # files imports this module for its uploads

    if not uri.startswith("s3://"):
        path = files.filesystem(uri)[1]
        return of_file(path) if Path(path).is_file() else None
    bucket, _, key = uri[len("s3://"):].partition("/")
    head = files.s3_head(bucket, key)
    if head is None:
        return None
    if head.get("ChecksumCRC32") and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        return from_s3(head["ChecksumCRC32"])
    return files.s3_stream_crc32(bucket, key)


def compare(root: str, expected: dict[str, str], *, threads: int = 16) -> list[Mismatch]:
    """Each ``root/<file>`` against its expected checksum, in parallel (S3 HEADs are latency-bound)."""
    from raysft.storage import files

    names = sorted(expected)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(names)))) as pool:
        found = list(pool.map(lambda rel: stored(files.join(root, rel)), names))
    return [Mismatch(rel, expected[rel], got or "missing") for rel, got in zip(names, found) if got != expected[rel]]


def compare_local(root: str | Path, expected: dict[str, str]) -> list[Mismatch]:
    """Files downloaded into ``root`` against their expected checksums."""
    out = []
    for rel, want in sorted(expected.items()):
        p = Path(root) / rel
        got = of_file(p) if p.is_file() else "missing"
        if got != want:
            out.append(Mismatch(rel, want, got))
    return out

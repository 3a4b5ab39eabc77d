"""Reading a data file: its format, its row count, and rows by physical index.

Pure (no Ray, no torch). Rows are addressed by *physical* index (jsonl: physical line, blank and
broken lines included), so a row index means the same thing to the planner, the readers and a
resumed run. Counting never reads row data (parquet footers, arrow batch headers, one byte-scan of
jsonl), so planning a 100 GB mixture costs seconds, not a full load.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysft.data.validate import RowError

EXTENSIONS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".arrow": "arrow"}


class DataSourceError(ValueError):
    """A source spec that cannot be resolved or read; the message says what to change."""


@dataclass(frozen=True)
class SourceFile:
    path: str
    """Local path or fsspec URL (``hf://datasets/<id>/<file>``)."""
    format: str
    """``parquet`` | ``jsonl`` (JSON Lines, also ``.json`` files holding one object per line) |
    ``json`` (a ``.json`` file holding one JSON array) | ``arrow`` (IPC file or stream)."""
    num_rows: int
    """Physical rows (jsonl: physical lines, blank and broken lines included)."""


# ----------------------------------------------------------------------------- count


def source_file(path: str, fmt: str | None = None) -> SourceFile:
    fmt = fmt or _format_of(path)
    return SourceFile(path=path, format=fmt, num_rows=_count_rows(path, fmt))


def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise DataSourceError(f"{path!r}: unsupported file type {ext!r}; supported: {', '.join(EXTENSIONS)}")
    if EXTENSIONS[ext] != "json":
        return EXTENSIONS[ext]
    # A .json file is either JSON Lines (what `datasets` writes with to_json) or one JSON array.
    with _open(path) as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "json" if head.startswith(b"[") else "jsonl"


def _open(path: str):
    if "://" in path:
        return fsspec.open(path, "rb").open()
    return open(path, "rb")


@contextlib.contextmanager
def _parquet(path: str) -> Iterator[pq.ParquetFile]:
    # Local paths go to Arrow's native reader; URLs through an fsspec file (range requests).
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(_open(path)) if "://" in path else path
        yield stack.enter_context(pq.ParquetFile(src))


def _count_rows(path: str, fmt: str) -> int:
    if fmt == "parquet":
        with _parquet(path) as pf:
            return pf.metadata.num_rows  # footer only
    if fmt == "arrow":
        with _arrow_reader(path) as reader:
            return sum(b.num_rows for b in _batches(reader))
    if fmt == "jsonl":
        return len(line_offsets(path))
    return len(_json_array(path, _stamp(path)))


def _stamp(path: str) -> tuple:
    """Cache key part that changes when a local file is rewritten (remote files: path only)."""
    if "://" in path:
        return ()
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns)


def file_stamp(path: str) -> dict:
    """What identifies a file's content version without reading it: size and modification time for a
    local file; size and the store's version tag (ETag, blob sha, last modified) for a remote one."""
    if "://" not in path:
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    fs, _, (p,) = fsspec.get_fs_token_paths(path)
    info = fs.info(p)
    keys = ("size", "ETag", "etag", "sha256", "blob_id", "last_commit", "LastModified", "last_modified", "mtime")
    return {k: str(info[k]) for k in keys if info.get(k) is not None}


def line_offsets(path: str) -> np.ndarray:
    """Byte offset of every physical line start (read-only int64 array, one entry per line)."""
    return _line_bounds(path, _stamp(path))[:-1]


@functools.lru_cache(maxsize=64)
def _line_bounds(path: str, stamp: tuple, chunk_bytes: int = 1 << 24) -> np.ndarray:
    """Line starts plus the file size as a final sentinel, from one streaming pass over bytes."""
    found, size = [np.zeros(1, np.int64)], 0
    with _open(path) as f:
        while chunk := f.read(chunk_bytes):
            found.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 0x0A).astype(np.int64) + size + 1)
            size += len(chunk)
    starts = np.concatenate(found)
    starts = starts[starts < size]  # a final "\n" ends the last line, it does not start a new one
    out = np.append(starts, np.int64(size))
    out.setflags(write=False)  # shared through the cache
    return out


@functools.lru_cache(maxsize=2)
def _json_array(path: str, stamp: tuple) -> list:
    # NOTE: a JSON array document can only be parsed whole (memory ~ file size); large data should be jsonl.
    with _open(path) as f:
        try:
            doc = json.loads(f.read())
        except (UnicodeDecodeError, ValueError) as e:
            raise DataSourceError(f"{path!r} is not valid JSON ({e}); fix it or convert it to JSON Lines") from e
    if not isinstance(doc, list):
        raise DataSourceError(f"{path!r} holds one JSON {type(doc).__name__}, not rows; "
                              f"use JSON Lines (one object per line) or a top-level array")
    return doc


class _arrow_reader:
    """Context manager: an IPC file reader (random access) or stream reader (what `datasets` writes)."""

    def __init__(self, path: str):
        self.src = pa.memory_map(path) if "://" not in path else _open(path)  # mmap: skipped batches cost nothing

    def __enter__(self):
        magic = self.src.read(6)
        self.src.seek(0)
        return pa.ipc.open_file(self.src) if magic == b"ARROW1" else pa.ipc.open_stream(self.src)

    def __exit__(self, *exc):
        self.src.close()


def _batches(reader) -> Iterator[pa.RecordBatch]:
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    return iter(reader)


# ----------------------------------------------------------------------------- read


def read_rows(file: SourceFile, rows: np.ndarray, columns: list[str] | None = None) -> Iterator[tuple[int, dict | RowError]]:
    """Yield ``(row_index, raw_dict | RowError)`` for sorted physical row indices, reading only what is needed.

    parquet: only the row groups holding requested rows (and only ``columns``); arrow: only those
    record batches; jsonl: seeks to each line. A missing requested column is an error for
    parquet/arrow (fixed schema); jsonl rows just lack the key (the validator reports it per row).
    A bad jsonl line (invalid UTF-8 or JSON, not an object, blank) yields a RowError, never raises.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (np.any(np.diff(rows) < 0) or rows[0] < 0 or rows[-1] >= file.num_rows):
        raise IndexError(f"{file.path}: row indices must be sorted and within [0, {file.num_rows}), "
                         f"got {rows[:5].tolist()}...{rows[-1]}")
    if file.format == "parquet":
        yield from _read_parquet(file.path, rows, columns)
    elif file.format == "arrow":
        yield from _read_arrow(file.path, rows, columns)
    elif file.format == "jsonl":
        yield from _read_jsonl(file.path, rows, columns)
    elif file.format == "json":
        doc = _json_array(file.path, _stamp(file.path))
        for r in rows.tolist():
            yield r, _select(doc[r], columns) if isinstance(doc[r], dict) else _not_object(doc[r], f"element {r}")
    else:
        raise DataSourceError(f"{file.path}: unknown format {file.format!r}")


def _check_columns(path: str, present: list[str], columns: list[str] | None) -> None:
    missing = [c for c in columns or [] if c not in present]
    if missing:
        raise DataSourceError(f"{path}: column(s) {missing} not found; columns present: {present}. "
                              f"Fix the source's `columns` (or the column map)")


def _take(table, local: np.ndarray, columns: list[str] | None) -> list[dict]:
    if columns:
        table = table.select(columns)
    return table.take(pa.array(local)).to_pylist()


def _read_parquet(path: str, rows: np.ndarray, columns: list[str] | None):
    with _parquet(path) as pf:
        _check_columns(path, pf.schema_arrow.names, columns)
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        groups = np.searchsorted(starts, rows, side="right") - 1
        for g in np.unique(groups).tolist():
            sel = rows[groups == g]
            table = pf.read_row_group(g, columns=columns)
            yield from zip(sel.tolist(), _take(table, sel - starts[g], columns))


def _read_arrow(path: str, rows: np.ndarray, columns: list[str] | None):
    with _arrow_reader(path) as reader:
        _check_columns(path, reader.schema.names, columns)
        start, i = 0, 0
        for batch in _batches(reader):
            end = start + batch.num_rows
            j = int(np.searchsorted(rows, end, side="left"))
            if j > i:
                sel = rows[i:j]
                yield from zip(sel.tolist(), _take(batch, sel - start, columns))
            i, start = j, end
            if i == rows.size:
                break


def _read_jsonl(path: str, rows: np.ndarray, columns: list[str] | None):
    bounds = _line_bounds(path, _stamp(path))
    with _open(path) as f:
        for r in rows.tolist():
            f.seek(int(bounds[r]))
            yield r, _parse_line(f.read(int(bounds[r + 1] - bounds[r])), r + 1, columns)


def _parse_line(raw: bytes, lineno: int, columns: list[str] | None) -> dict | RowError:
    raw = raw.rstrip(b"\r\n")
    where = f"line {lineno}"
    if not raw.strip():
        return RowError("blank_line", where, f"{where} is blank; remove empty lines from the file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError("invalid_utf8", where, f"{where} is not valid UTF-8 (byte 0x{raw[e.start]:02X} at column "
                                               f"{e.start + 1}); re-encode the file as UTF-8")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        return RowError("invalid_json", where, f"{where} is not valid JSON ({e}); each line must be one complete JSON object")
    return _select(obj, columns) if isinstance(obj, dict) else _not_object(obj, where)


def _not_object(obj, where: str) -> RowError:
    return RowError("not_an_object", where, f"{where} is a JSON {type(obj).__name__}, not an object; "
                                            f"each row must be an object such as {{\"messages\": [...]}}")


def _select(obj: dict, columns: list[str] | None) -> dict:
    return obj if columns is None else {c: obj[c] for c in columns if c in obj}

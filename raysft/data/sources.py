"""Where rows come from: resolve a source spec to files, count their rows, read rows by index.

Pure (no Ray, no torch): the mixture planner calls :func:`resolve_files` once per source on the
driver, and data tasks call :func:`read_rows` with the physical row indices they were assigned.
Rows are addressed by *physical* index (jsonl: physical line, blank and broken lines included), so
a row index means the same thing to the planner, the readers and a resumed run.

NOTE: counting never reads row data (parquet footers, arrow batch headers, one byte-scan of jsonl),
so planning a 100 GB mixture costs seconds, not a full load.
"""

from __future__ import annotations

import contextlib
import functools
import glob as globlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from raysft import assets
from raysft.data.validate import RowError

EXTENSIONS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".arrow": "arrow"}
# `datasets` metadata files that look like .json data but are not rows.
_METADATA = {"dataset_info.json", "state.json", "dataset_dict.json"}
_SHARD_SUFFIX = re.compile(r"(-\d{5}-of-\d{5})?\.(parquet|jsonl|ndjson|json|arrow)$")


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


# ----------------------------------------------------------------------------- resolve


def resolve_files(
    *, id: str | None = None, path: str | None = None, config: str | None = None,
    split: str = "train", data_root: str | None = None, revision: str | None = None,
) -> list[SourceFile]:
    """Resolve one source spec to its data files, in a stable order, with row counts.

    Exactly one of ``id`` / ``path``. ``bundled:<rel>`` in ``path`` or ``data_root`` means
    ``raysft/assets/<rel>`` (e.g. ``bundled:data/smoltalk2-sample``), as everywhere in the config.

    ``path`` is, checked in this order:
      0. an fsspec URL (``s3://bucket/data/*.parquet``): that file or glob, sorted;
      1. a file (``.parquet``, ``.jsonl``/``.ndjson``, ``.json``, ``.arrow``);
      2. a ``DatasetDict.save_to_disk`` folder (``dataset_dict.json``): the ``split`` sub-folder;
      3. a ``Dataset.save_to_disk`` folder (``state.json``): its ``.arrow`` shards in saved order
         (``split`` is ignored: a saved Dataset has one);
      4. a directory in hub layout: a README.md whose YAML header has ``configs:`` (``data_files``
         patterns per split, globbed), or ``<config>/<split>-*`` when ``config`` is set;
      5. a directory of data files (not recursive, sorted): the files named ``<split>-*`` /
         ``<split>.*`` if any, else all of them when ``split == "train"`` (the default).
    ``id`` with ``data_root``: ``data_root`` (or ``data_root/<id>`` if that exists) is a local
    mirror of the hub dataset in hub layout, resolved as in 4.
    ``id`` alone: the hub through ``huggingface_hub.HfFileSystem`` (``hf://datasets/<id>/...``), the
    dataset card's ``configs`` patterns if present, else ``<config>/<split>-*.parquet``.
    """
    if (id is None) == (path is None):
        raise DataSourceError(f"a data source needs exactly one of `id` or `path` (got id={id!r}, path={path!r})")
    if path is not None:
        return _resolve_path(_expand(path), config, split)
    if data_root is not None:
        root = Path(_expand(data_root))
        if (root / id).is_dir():
            root = root / id
        if not root.is_dir():
            raise DataSourceError(f"data.root={data_root!r} is not a directory; point it at a local mirror of {id!r} in hub layout")
        return _resolve_hub_layout_local(root, config, split, what=f"local mirror {str(root)!r} of {id!r}")
    return _resolve_hub(id, config, split, revision)


def _expand(p: str) -> str:
    return os.path.expanduser(assets.resolve(p))  # same `bundled:` rule as every other config path


def _resolve_path(path: str, config: str | None, split: str) -> list[SourceFile]:
    if "://" in path:  # a remote file or glob (s3://, hf://, ...): no folder conventions
        import fsspec
        fs, _, found = fsspec.get_fs_token_paths(path)
        urls = sorted(fs.unstrip_protocol(f) for f in found if Path(f).suffix in EXTENSIONS)
        if not urls:
            raise DataSourceError(f"no data files ({', '.join(EXTENSIONS)}) matched {path!r}")
        return [_source_file(u) for u in urls]
    p = Path(path)
    if p.is_file():
        return [_source_file(str(p))]
    if not p.is_dir():
        raise DataSourceError(f"source path {path!r} does not exist; give a data file, a directory, or a save_to_disk folder")
    if (p / "dataset_dict.json").is_file():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise DataSourceError(f"split {split!r} is not in the DatasetDict at {path!r}; available splits: {splits}")
        return _resolve_saved_dataset(p / split)
    if (p / "state.json").is_file():
        return _resolve_saved_dataset(p)
    if config is not None or _card_configs(_read_local(p / "README.md")) is not None:
        return _resolve_hub_layout_local(p, config, split, what=f"directory {path!r}")
    files = _data_files_in(p)
    named = [f for f in files if re.match(rf"{re.escape(split)}[-.]", f.name)]
    if named or split != "train":
        if not named:
            found = sorted({_SHARD_SUFFIX.sub("", f.name) for f in files})
            raise DataSourceError(f"no files named {split}-* or {split}.* in {path!r} (files found: {found}); "
                                  f"set split= to one of them, or leave split=train to read every file")
        files = named
    if not files:
        raise DataSourceError(f"no data files ({', '.join(EXTENSIONS)}) in directory {path!r}")
    return [_source_file(str(f)) for f in files]


def _data_files_in(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir()
                  if f.is_file() and f.suffix in EXTENSIONS and f.name not in _METADATA and not f.name.startswith("."))


def _resolve_saved_dataset(d: Path) -> list[SourceFile]:
    # NOTE: state.json lists the shards in the order `datasets` concatenates them; use it, not a glob.
    state = json.loads((d / "state.json").read_text())
    names = [f["filename"] for f in state.get("_data_files", [])]
    if not names:
        raise DataSourceError(f"save_to_disk folder {str(d)!r} lists no data files in state.json")
    return [_source_file(str(d / n), fmt="arrow") for n in names]


def _read_local(p: Path) -> str | None:
    return p.read_text(encoding="utf-8") if p.is_file() else None


def _card_configs(readme: str | None) -> list[dict] | None:
    """The ``configs:`` list of a dataset card's YAML header, or None."""
    if not readme or not readme.startswith("---"):
        return None
    end = readme.find("\n---", 3)
    header = yaml.safe_load(readme[3:end] if end > 0 else "") or {}
    configs = header.get("configs") if isinstance(header, dict) else None
    return configs if isinstance(configs, list) and configs else None


def _split_patterns(configs: list[dict] | None, config: str | None, split: str, what: str) -> list[str]:
    """Glob patterns (relative to the dataset root) for one split, from the card or by convention."""
    if configs is None:
        prefix = f"{config}/" if config else ""
        return [f"{prefix}{split}-*", f"{prefix}{split}.*"]
    names = [c.get("config_name", "default") for c in configs]
    if config is None:
        defaults = [c for c in configs if c.get("default")] or (configs if len(configs) == 1 else [])
        if not defaults:
            raise DataSourceError(f"{what} has several configs {names}; set config= to one of them")
        entry = defaults[0]
    elif config in names:
        entry = configs[names.index(config)]
    else:
        raise DataSourceError(f"config {config!r} is not in {what}; available configs: {names}")
    data_files = entry.get("data_files", {})
    # The card allows four spellings: a pattern, a list of patterns (both mean split "train"),
    # a list of {split, path} and a {split: pattern(s)} mapping.
    if isinstance(data_files, (str, list)) and not (isinstance(data_files, list) and data_files and isinstance(data_files[0], dict)):
        data_files = {"train": data_files}
    elif isinstance(data_files, list):
        data_files = {d["split"]: d["path"] for d in data_files}
    if split not in data_files:
        raise DataSourceError(f"split {split!r} is not in config {entry.get('config_name')!r} of {what}; "
                              f"available splits: {list(data_files)}")
    pats = data_files[split]
    return [pats] if isinstance(pats, str) else list(pats)


def _resolve_hub_layout_local(root: Path, config: str | None, split: str, what: str) -> list[SourceFile]:
    configs = _card_configs(_read_local(root / "README.md"))
    if configs is None and config is not None and not (root / config).is_dir():
        subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        raise DataSourceError(f"config {config!r} is not in {what} (no {config}/ folder); available configs: {subdirs}")
    patterns = _split_patterns(configs, config, split, what)
    paths = sorted({p for pat in patterns for p in globlib.glob(str(root / pat), recursive=True)
                    if os.path.isfile(p) and Path(p).suffix in EXTENSIONS})
    if not paths:
        d = root / config if config else root
        avail = sorted({_SHARD_SUFFIX.sub("", f.name) for f in _data_files_in(d)}) if d.is_dir() else []
        raise DataSourceError(f"no files matched {[str(root / p) for p in patterns]} in {what}; available splits: {avail}")
    return [_source_file(p) for p in paths]


def _resolve_hub(id: str, config: str | None, split: str, revision: str | None = None) -> list[SourceFile]:
    try:
        from huggingface_hub import HfFileSystem
    except ImportError as e:
        raise DataSourceError(f"reading dataset {id!r} from the hub needs huggingface_hub (pip install huggingface_hub), "
                              f"or set data.root=<local mirror> / source path=...") from e
    # HfFileSystem addresses a revision as datasets/<id>@<revision>/...
    at = f"@{revision}" if revision and revision != "main" else ""
    fs, base, what = HfFileSystem(), f"datasets/{id}{at}", f"hub dataset {id!r}" + (f" at {revision!r}" if at else "")
    try:
        try:
            fs.ls(base, detail=False)
        except FileNotFoundError as e:
            raise DataSourceError(f"{what} was not found (misspelt id, or private/gated: run `hf auth login`)") from e
        try:
            readme = fs.cat_file(f"{base}/README.md").decode("utf-8")
        except FileNotFoundError:
            readme = None
        configs = _card_configs(readme)
        patterns = _split_patterns(configs, config, split, what)
        if configs is None:  # hub convention without a card: parquet shards only
            patterns = [patterns[0] + ".parquet"]
        paths = sorted({p for pat in patterns for p in fs.glob(f"{base}/{pat}") if Path(p).suffix in EXTENSIONS})
        if not paths:
            raise DataSourceError(f"no files matched {[f'hf://{base}/{p}' for p in patterns]} in {what}")
        return [_source_file(f"hf://{p}") for p in paths]
    except DataSourceError:
        raise
    except Exception as e:
        if type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            raise DataSourceError(f"{what}: {type(e).__name__} (misspelt id, or private/gated: run `hf auth login`)") from e
        if not _is_network_error(e):
            raise
        why = "HF_HUB_OFFLINE=1 is set" if _offline(e) else f"no network: {type(e).__name__}: {e}"
        raise DataSourceError(f"cannot reach the hub for dataset {id!r}; set data.root=<local mirror> "
                              f"or source path=... ({why})") from e


def _offline(e: BaseException) -> bool:
    return type(e).__name__ == "OfflineModeIsEnabled" or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _is_network_error(e: BaseException) -> bool:
    # huggingface_hub raises errors from whichever HTTP client it was built on (httpx, requests,
    # aiohttp), so classify by the exception's ancestry rather than by a fixed list of classes.
    if isinstance(e, (ConnectionError, TimeoutError, OSError)):
        return True
    return any(c.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3", "aiohttp")
               for c in type(e).__mro__)


# ----------------------------------------------------------------------------- count


def _source_file(path: str, fmt: str | None = None) -> SourceFile:
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
        import fsspec
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

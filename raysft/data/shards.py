"""The prepared data format, and reading it back: packed rows in parquet shards, one per work unit.

A shard holds fixed-length rows (``max_length`` tokens each) in four columns, each a fixed-size
list: ``input_ids`` (int32), ``labels`` (int32, -100 = not trained), ``position_ids`` (int32,
restarting at 0 at every packed sequence: the sequence boundaries) and ``source_ids`` (int16, the
mixture source of each token, -1 for padding). Any parquet reader opens them
(``datasets.load_dataset("parquet", data_files=...)``, pandas, duckdb). The unit's counts (rows
read, kept, dropped, tokens) ride in the file's key-value metadata, so a resumed prepare knows a
finished unit from its footer alone.

Rows are addressed by a global index per split: shard after shard in unit order. Training reads
them in a seeded permutation per epoch (``train_order``: pack once, reshuffle every epoch, as the
HF sampler does), each worker its own round-robin share, straight from storage: no central actor.
"""

from __future__ import annotations

import json
import queue
import threading
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysft.storage import files
from raysft.storage.retry import retrying

FORMAT_VERSION = 1
COLUMNS = {"input_ids": pa.int32(), "labels": pa.int32(), "position_ids": pa.int32(), "source_ids": pa.int16()}
STATS_KEY = b"raysft.unit_stats"
# A row group is the unit of a read. Small groups keep a random row cheap to fetch (one range
# request of <= ~1 MiB); big rows (32k-65k tokens) get a group each.
ROW_GROUP_BYTES = 1 << 20
MAX_ROWS_PER_GROUP = 64
CACHE_BYTES = 256 << 20  # row groups kept in memory per reader
STALL_HELP = ("reading the prepared data is not making progress: check that storage is reachable from the "
              "workers (storage.path). Timeout: scaling.data_timeout_s.")


class DataStallError(RuntimeError):
    """No batch arrived within the timeout: fail loudly instead of hanging."""


def rows_per_group(max_length: int) -> int:
    return int(max(1, min(MAX_ROWS_PER_GROUP, ROW_GROUP_BYTES // (max_length * 14))))


def write_shard(uri: str, columns: dict[str, np.ndarray], stats: dict[str, Any], max_length: int) -> tuple[int, str]:
    """Write one unit's packed rows; returns (row count, the file's CRC32 for the manifest). The object
    appears whole or not at all (local: written aside, then renamed; object stores publish an upload
    only when it completes, and S3 checks the CRC32 it is sent with)."""
    n = len(columns["input_ids"])
    arrays = {c: pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(columns[c], dtype=t.to_pandas_dtype()).reshape(-1), t),
                                                   max_length) for c, t in COLUMNS.items()}
    table = pa.table(arrays).replace_schema_metadata({STATS_KEY: json.dumps(stats).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=rows_per_group(max_length), compression="zstd")
    return n, files.write_verified(uri, sink.getvalue().to_pybytes())


def shard_stats(uri: str) -> dict[str, Any] | None:
    """The unit counts stored in a finished shard's footer; None when the shard is not there."""
    fs, path = files.filesystem(uri)

    def get() -> dict | None:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_file(path) as f:
            return pq.read_metadata(f).metadata or {}

    meta = retrying(f"read {uri}", get)
    return json.loads(meta[STATS_KEY]) if meta and STATS_KEY in meta else None


def train_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s order of the packed train rows: a seeded permutation (every epoch, the first too)."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_rows)


class PreparedRows:
    """Random access to a prepared set's rows, by split and global row index, local or in object storage.

    ``shards``: per split, ``[(uri, rows), ...]`` in unit order (from the manifest). Thread-safe; row
    groups are cached (LRU, ``CACHE_BYTES``)."""

    def __init__(self, shards: dict[str, list[tuple[str, int]]], max_length: int):
        self.shards, self.max_length = shards, max_length
        self.starts = {s: np.cumsum([0] + [n for _, n in v]) for s, v in shards.items()}
        self.rpg = rows_per_group(max_length)
        self._groups: OrderedDict[tuple[str, int, int], dict[str, np.ndarray]] = OrderedDict()
        self._files: OrderedDict[tuple[str, int], pq.ParquetFile] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def num_rows(self, split: str) -> int:
        return int(self.starts[split][-1]) if split in self.starts else 0

    def read(self, split: str, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``indices`` of ``split``, in that order: ``{column: [len(indices), max_length]}``."""
        indices = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.starts[split], indices, side="right") - 1
        local = indices - self.starts[split][shard]
        out = {c: np.empty((len(indices), self.max_length), dtype=t.to_pandas_dtype()) for c, t in COLUMNS.items()}
        for i, (s, r) in enumerate(zip(shard, local)):
            group = self._group(split, int(s), int(r) // self.rpg)
            for c in COLUMNS:
                out[c][i] = group[c][int(r) % self.rpg]
        return out

    def _group(self, split: str, shard: int, group: int) -> dict[str, np.ndarray]:
        key = (split, shard, group)
        with self._lock:
            if key in self._groups:
                self._groups.move_to_end(key)
                return self._groups[key]
            table = retrying(f"read {self.shards[split][shard][0]}", lambda: self._read_group(split, shard, group))
            data = {c: table.column(c).combine_chunks().flatten().to_numpy().reshape(-1, self.max_length)
                    for c in COLUMNS}
            self._groups[key] = data
            self._bytes += sum(a.nbytes for a in data.values())
            while self._bytes > CACHE_BYTES and len(self._groups) > 1:
                _, old = self._groups.popitem(last=False)
                self._bytes -= sum(a.nbytes for a in old.values())
            return data

    def _read_group(self, split: str, shard: int, group: int) -> pa.Table:
        try:
            return self._file(split, shard).read_row_group(group, columns=list(COLUMNS))
        except Exception:
            self._files.pop((split, shard), None)  # reopen on the retry: the connection may be gone
            raise

    def _file(self, split: str, shard: int) -> pq.ParquetFile:
        key = (split, shard)
        if key not in self._files:
            fs, path = files.filesystem(self.shards[split][shard][0])
            self._files[key] = pq.ParquetFile(fs.open_input_file(path))
            while len(self._files) > 32:
                self._files.popitem(last=False)[1].close()
        self._files.move_to_end(key)
        return self._files[key]


class RowStream:
    """One worker's endless micro-batches of the global train order, read ahead on a thread.

    Global position ``g`` is row ``train_order(N, seed, g // N)[g % N]``. Rank ``r`` of ``W`` takes
    the positions ``start + r, start + r + W, ...`` (round-robin, like HF's DistributedSampler), ``B``
    a micro-batch, so after any number of whole steps the consumed positions are a prefix of the
    global order: the data cursor is one number, valid for any ``W`` (exact resume, elastic resize).

    ``skips``: ``[start, end)`` ranges of raw positions never trained (the batches a rollback past a
    loss spike skipped, ``anomalies.jsonl``): the cursor counts trained positions, and position ``v``
    reads raw position ``raw(v)``, past every skipped range before it."""

    def __init__(self, rows: PreparedRows, *, rank: int, world: int, batch: int, start: int, seed: int,
                 timeout_s: float, prefetch: int = 4, skips: list[tuple[int, int]] | None = None):
        self.rows, self.rank, self.world, self.batch, self.start, self.seed = rows, rank, world, batch, start, seed
        self.skips = sorted((int(a), int(b)) for a, b in (skips or []))
        self.timeout_s = timeout_s
        self.n = rows.num_rows("train")
        if self.n == 0:
            raise RuntimeError("the prepared set has no training rows")
        self.prefetch = prefetch
        self._orders: dict[int, np.ndarray] = {}

    def positions(self, k: int) -> np.ndarray:
        """Global positions of this rank's micro-batch ``k``."""
        j = np.arange(self.batch, dtype=np.int64)
        return self.start + (k * self.batch + j) * self.world + self.rank

    def raw(self, positions: np.ndarray) -> np.ndarray:
        """Trained positions -> positions of the global order, past the skipped ranges."""
        out = np.asarray(positions, dtype=np.int64).copy()
        for a, b in self.skips:
            out[out >= a] += b - a
        return out

    def row_ids(self, positions: np.ndarray) -> np.ndarray:
        positions = self.raw(positions)
        epochs = positions // self.n
        out = np.empty(len(positions), dtype=np.int64)
        for e in np.unique(epochs):
            if int(e) not in self._orders:
                self._orders = {int(e): train_order(self.n, self.seed, int(e))}  # one epoch's order at a time
            sel = epochs == e
            out[sel] = self._orders[int(e)][positions[sel] % self.n]
        return out

    def batch_at(self, k: int) -> dict[str, np.ndarray]:
        return self.rows.read("train", self.row_ids(self.positions(k)))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return _read_ahead((self.batch_at(k) for k in _count()), self.prefetch, self.timeout_s, "training")


def eval_batches(rows: PreparedRows, *, rank: int, world: int, batch: int,
                 timeout_s: float) -> Iterator[dict[str, np.ndarray]]:
    """This rank's share of the eval rows (the same count on every rank, as Ray's equal split: the
    ``N mod W`` last rows are left out so no rank waits in the loss gather), in order, read ahead."""
    per_rank = rows.num_rows("eval") // world
    ids = np.arange(per_rank, dtype=np.int64) * world + rank
    return _read_ahead((rows.read("eval", ids[i:i + batch]) for i in range(0, per_rank, batch)), 2, timeout_s, "eval")


def _count() -> Iterator[int]:
    k = 0
    while True:
        yield k
        k += 1


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def _read_ahead(source: Iterator[Any], depth: int, timeout_s: float, what: str) -> Iterator[Any]:
    """``source`` consumed on a daemon thread, ``depth`` items ahead; its errors re-raised here, and
    ``DataStallError`` when nothing arrives for ``timeout_s``."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # surfaced in the consuming thread
            q.put(_Failed(e))

    threading.Thread(target=pump, daemon=True, name="raysft-read-ahead").start()
    try:
        while True:
            try:
                item = q.get(timeout=timeout_s)
            except queue.Empty:
                raise DataStallError(f"no {what} batch for {timeout_s:.0f} s: {STALL_HELP}") from None
            if item is done:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()

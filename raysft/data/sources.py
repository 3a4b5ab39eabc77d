"""Where rows come from: resolve a source spec (hub id, local path, hub-layout mirror, saved dataset)
to its data files, in a stable order, with row counts (``readers.py`` counts and reads them).

Pure (no Ray, no torch): the mixture planner calls :func:`resolve_files` once per source on the
driver, and data tasks call :func:`read_rows` with the physical row indices they were assigned.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import re
from pathlib import Path

import fsspec
import yaml
import huggingface_hub

from raysft import assets
from raysft.data.readers import EXTENSIONS, DataSourceError, SourceFile, read_rows, source_file

__all__ = ["DataSourceError", "SourceFile", "read_rows", "resolve_files"]

# `datasets` metadata files that look like .json data but are not rows.
_METADATA = {"dataset_info.json", "state.json", "dataset_dict.json"}
_SHARD_SUFFIX = re.compile(r"(-\d{5}-of-\d{5})?\.(parquet|jsonl|ndjson|json|arrow)$")

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
        fs, _, found = fsspec.get_fs_token_paths(path)
        urls = sorted(fs.unstrip_protocol(f) for f in found if Path(f).suffix in EXTENSIONS)
        if not urls:
            raise DataSourceError(f"no data files ({', '.join(EXTENSIONS)}) matched {path!r}")
        return [source_file(u) for u in urls]
    p = Path(path)
    if p.is_file():
        return [source_file(str(p))]
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
    return [source_file(str(f)) for f in files]


def _data_files_in(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir()
                  if f.is_file() and f.suffix in EXTENSIONS and f.name not in _METADATA and not f.name.startswith("."))


def _resolve_saved_dataset(d: Path) -> list[SourceFile]:
    # NOTE: state.json lists the shards in the order `datasets` concatenates them; use it, not a glob.
    state = json.loads((d / "state.json").read_text())
    names = [f["filename"] for f in state.get("_data_files", [])]
    if not names:
        raise DataSourceError(f"save_to_disk folder {str(d)!r} lists no data files in state.json")
    return [source_file(str(d / n), fmt="arrow") for n in names]


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
    return [source_file(p) for p in paths]


def _resolve_hub(id: str, config: str | None, split: str, revision: str | None = None) -> list[SourceFile]:
    # HfFileSystem addresses a revision as datasets/<id>@<revision>/...
    at = f"@{revision}" if revision and revision != "main" else ""
    fs, base, what = huggingface_hub.HfFileSystem(), f"datasets/{id}{at}", f"hub dataset {id!r}" + (f" at {revision!r}" if at else "")
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
        return [source_file(f"hf://{p}") for p in paths]
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

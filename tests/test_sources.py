"""Source resolution, row counting and row reads (raysft.data.sources): fast, no Ray, no network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysft.data.readers import line_offsets
from raysft.data.sources import DataSourceError, SourceFile, read_rows, resolve_files
from raysft.data.validate import ColumnMap, RowError, normalize

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "raysft" / "assets" / "data" / "smoltalk2-sample"
SHARED_MINI = ROOT.parent / "shared" / "data" / "smoltalk2-mini"
ASSETS = Path(__file__).parent / "assets"
HUB_ID = "HuggingFaceTB/smoltalk2"
needs_shared = pytest.mark.skipif(not SHARED_MINI.is_dir(), reason="needs ../shared/data/smoltalk2-mini")


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "n": i} for i in range(start, start + n)]


def _full(f: SourceFile) -> list:
    return [raw for _, raw in read_rows(f, np.arange(f.num_rows), None)]


def _assert_subset_matches(files: list[SourceFile], reference: list[dict], seed: int = 0) -> None:
    """read_rows on a random sorted subset == the same rows of a full read done another way."""
    rng, base = np.random.default_rng(seed), 0
    for f in files:
        rows = np.sort(rng.choice(f.num_rows, size=max(1, f.num_rows // 3), replace=False))
        got = list(read_rows(f, rows, None))
        assert [r for r, _ in got] == rows.tolist()
        assert [raw for _, raw in got] == [reference[base + r] for r in rows.tolist()]
        base += f.num_rows
    assert base == len(reference)


# ----------------------------------------------------------------------------- hub layout


@pytest.mark.parametrize("config,split", [("SFT", "gsm8k_think"), ("SFT", "glaive_toolcall_en_demo_no_think"),
                                          ("Mid", "gsm8k_socratic"), ("Mid", "gsm8k_chained_multiturn_long")])
def test_bundled_sample_hub_layout(config, split):
    files = resolve_files(id=HUB_ID, path=None, config=config, split=split, data_root=str(SAMPLE))
    assert [Path(f.path).name for f in files] == [f"{split}-00000-of-00001.parquet"]
    assert files == resolve_files(path="bundled:data/smoltalk2-sample", config=config, split=split)
    table = pq.read_table(files[0].path)
    assert files[0].num_rows == table.num_rows and files[0].format == "parquet"
    _assert_subset_matches(files, table.to_pylist())


def test_missing_split_and_config_list_what_exists():
    with pytest.raises(DataSourceError, match=r"available splits: \['glaive_toolcall_en_demo_no_think', 'gsm8k_think'\]"):
        resolve_files(id=HUB_ID, config="SFT", split="gsm8k_thinkk", data_root=str(SAMPLE))
    with pytest.raises(DataSourceError, match=r"SFT/gsm8k_thinkk-\*"):  # the pattern tried
        resolve_files(id=HUB_ID, config="SFT", split="gsm8k_thinkk", data_root=str(SAMPLE))
    with pytest.raises(DataSourceError, match=r"available configs: \['Mid', 'SFT'\]"):
        resolve_files(id=HUB_ID, config="sft", split="gsm8k_think", data_root=str(SAMPLE))
    with pytest.raises(DataSourceError, match="exactly one of"):
        resolve_files(id=HUB_ID, path=str(SAMPLE), split="x")


@needs_shared
@pytest.mark.parametrize("config", ["SFT", "Mid"])
def test_shared_mini_via_card(config):
    import yaml

    card = yaml.safe_load((SHARED_MINI / "README.md").read_text().split("---")[1])
    splits = [d["split"] for c in card["configs"] if c["config_name"] == config for d in c["data_files"]]
    for split in splits:
        files = resolve_files(id=HUB_ID, path=None, config=config, split=split, data_root=str(SHARED_MINI))
        assert sum(f.num_rows for f in files) == sum(pq.ParquetFile(f.path).metadata.num_rows for f in files)
        assert all(Path(f.path).parent.name == config for f in files)
    with pytest.raises(DataSourceError, match="available splits: " + repr(splits).replace("[", r"\[").replace("]", r"\]")):
        resolve_files(id=HUB_ID, config=config, split="nope", data_root=str(SHARED_MINI))
    with pytest.raises(DataSourceError, match="several configs"):
        resolve_files(path=str(SHARED_MINI), split=splits[0])


@pytest.mark.parametrize("spelling", ["list_of_dicts", "mapping", "string"])
def test_card_data_files_spellings(tmp_path, spelling):
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(5)), tmp_path / "data" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(_rows(3, 5)), tmp_path / "data" / "part-1.parquet")
    data_files = {"list_of_dicts": "\n  - split: train\n    path: data/part-*",
                  "mapping": "\n    train: [data/part-0.parquet, data/part-1.parquet]",
                  "string": " data/*.parquet"}[spelling]
    (tmp_path / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:{data_files}\n---\n# card\n")
    files = resolve_files(path=str(tmp_path), split="train")
    assert [Path(f.path).name for f in files] == ["part-0.parquet", "part-1.parquet"]
    assert [f.num_rows for f in files] == [5, 3]
    _assert_subset_matches(files, _rows(8))


def test_hub_through_hffilesystem(tmp_path, monkeypatch):
    """The hub code path against a local fake of HfFileSystem (no network): card, convention, hf:// reads."""
    hf = pytest.importorskip("huggingface_hub")
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.registry import _registry

    shutil.copytree(SAMPLE, tmp_path / "datasets" / "org" / "nocard")
    shutil.copytree(SAMPLE, tmp_path / "datasets" / "org" / "card")
    (tmp_path / "datasets" / "org" / "card" / "README.md").write_text(
        "---\nconfigs:\n- config_name: SFT\n  data_files:\n  - split: think\n    path: SFT/gsm8k_think-*\n---\n")

    class FakeHub(DirFileSystem):
        protocol = "hf"

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(tmp_path), fs=LocalFileSystem())

    monkeypatch.setattr(hf, "HfFileSystem", FakeHub)
    monkeypatch.setitem(_registry, "hf", FakeHub)  # what fsspec.open("hf://...") instantiates
    (f,) = resolve_files(id="org/nocard", config="SFT", split="gsm8k_think")
    assert f.path == "hf://datasets/org/nocard/SFT/gsm8k_think-00000-of-00001.parquet" and f.num_rows == 2000
    (g,) = resolve_files(id="org/card", config="SFT", split="think")
    assert g.num_rows == 2000
    _assert_subset_matches([g], pq.read_table(SAMPLE / "SFT" / "gsm8k_think-00000-of-00001.parquet").to_pylist())
    with pytest.raises(DataSourceError, match=r"available splits: \['think'\]"):
        resolve_files(id="org/card", config="SFT", split="gsm8k_think")
    with pytest.raises(DataSourceError, match="not found"):
        resolve_files(id="org/missing", config="SFT", split="x")


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    hf = pytest.importorskip("huggingface_hub")

    class Offline:
        def ls(self, *a, **k):
            raise hf.errors.OfflineModeIsEnabled("offline mode is enabled")

    monkeypatch.setattr(hf, "HfFileSystem", Offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataSourceError, match=r"cannot reach the hub for dataset 'HuggingFaceTB/smoltalk2'; "
                                              r"set data.root=<local mirror> or source path=.*HF_HUB_OFFLINE=1"):
        resolve_files(id=HUB_ID, config="SFT", split="gsm8k_think")

    class NoNetwork:
        def ls(self, *a, **k):
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr(hf, "HfFileSystem", NoNetwork)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(DataSourceError, match="cannot reach the hub.*no network"):
        resolve_files(id=HUB_ID, config="SFT", split="gsm8k_think")


# ----------------------------------------------------------------------------- files and folders


def test_parquet_file_row_groups_and_columns(tmp_path):
    rows = _rows(100)
    p = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=7)  # 15 row groups
    (f,) = resolve_files(path=str(p))
    assert f == SourceFile(str(p), "parquet", 100)
    _assert_subset_matches([f], rows, seed=1)
    got = dict(read_rows(f, np.array([0, 6, 7, 99]), ["messages"]))
    assert got == {i: {"messages": rows[i]["messages"]} for i in (0, 6, 7, 99)}
    with pytest.raises(DataSourceError, match=r"x.parquet.*\['conversations'\] not found; columns present: \['id', 'messages', 'n'\]"):
        list(read_rows(f, np.array([0]), ["conversations"]))
    with pytest.raises(IndexError, match="sorted"):
        list(read_rows(f, np.array([5, 2]), None))
    with pytest.raises(IndexError, match="within"):
        list(read_rows(f, np.array([100]), None))


def test_directory_of_files_sorted_and_split_named(tmp_path):
    pq.write_table(pa.Table.from_pylist(_rows(4, 6)), tmp_path / "b.parquet")
    pq.write_table(pa.Table.from_pylist(_rows(6)), tmp_path / "a.parquet")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(2, 10)))
    files = resolve_files(path=str(tmp_path), split="train")
    assert [(Path(f.path).name, f.num_rows) for f in files] == [("a.parquet", 6), ("b.parquet", 4), ("c.jsonl", 2)]
    _assert_subset_matches(files, _rows(12))
    with pytest.raises(DataSourceError, match=r"no files named test-\* .*files found: \['a', 'b', 'c'\]"):
        resolve_files(path=str(tmp_path), split="test")
    # Split-named shards select their split only.
    d = tmp_path / "splits"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(3)), d / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(_rows(2)), d / "test-00000-of-00001.parquet")
    assert [f.num_rows for f in resolve_files(path=str(d), split="test")] == [2]
    assert [f.num_rows for f in resolve_files(path=str(d), split="train")] == [3]
    with pytest.raises(DataSourceError, match="does not exist"):
        resolve_files(path=str(tmp_path / "nope"))
    with pytest.raises(DataSourceError, match="unsupported file type '.csv'"):
        (tmp_path / "x.csv").write_text("a\n")
        resolve_files(path=str(tmp_path / "x.csv"))


def test_jsonl_physical_lines_and_offsets(tmp_path):
    lines = [b'{"a": 1}', b"", b'{"a": "\xc3\xa9"}', b"  ", b"[1]", b'{"a":', b'{"a": 3}\r']
    p = tmp_path / "x.jsonl"
    p.write_bytes(b"\n".join(lines))  # no final newline: the last line still counts
    (f,) = resolve_files(path=str(p))
    assert f.num_rows == len(lines) == 7
    starts = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]])
    assert line_offsets(str(p)).tolist() == starts.tolist()
    got = dict(read_rows(f, np.arange(7), None))
    assert got[0] == {"a": 1} and got[2] == {"a": "é"} and got[6] == {"a": 3}
    assert [got[i].reason for i in (1, 3, 4, 5)] == ["blank_line", "blank_line", "not_an_object", "invalid_json"]
    assert got[5].field == "line 6"
    assert dict(read_rows(f, np.array([2, 6]), ["a", "b"])) == {2: {"a": "é"}, 6: {"a": 3}}
    p.write_bytes(b'{"a": 1}\n\n')  # rewritten file: the offsets cache must not serve stale offsets
    assert resolve_files(path=str(p))[0].num_rows == 2 and line_offsets(str(p)).tolist() == [0, 9]


def test_bad_rows_asset_reads_without_raising():
    (f,) = resolve_files(path=str(ASSETS / "bad_rows.jsonl"))
    assert f.format == "jsonl" and f.num_rows == 28
    got = dict(read_rows(f, np.arange(28), None))
    assert {i + 1 for i, r in got.items() if isinstance(r, RowError)} == {18, 19, 27, 28}
    assert dict(read_rows(f, np.array([1, 16]), None)) == {1: got[1], 16: got[16]}  # seeking == sequential


def test_json_array_and_json_lines(tmp_path):
    rows = _rows(5)
    (tmp_path / "arr.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    (a,) = resolve_files(path=str(tmp_path / "arr.json"))
    (b,) = resolve_files(path=str(tmp_path / "lines.json"))
    assert (a.format, a.num_rows, b.format, b.num_rows) == ("json", 5, "jsonl", 5)
    assert _full(a) == _full(b) == rows
    (tmp_path / "obj.json").write_text('{"data": []}\n')
    assert resolve_files(path=str(tmp_path / "obj.json"))[0].format == "jsonl"  # one object = one JSON line


def test_arrow_ipc_file_and_stream(tmp_path):
    rows = _rows(50)
    table = pa.Table.from_pylist(rows)
    for name, opener in [("file.arrow", pa.ipc.new_file), ("stream.arrow", pa.ipc.new_stream)]:
        with opener(tmp_path / name, table.schema) as w:
            for batch in table.to_batches(max_chunksize=8):
                w.write_batch(batch)
        (f,) = resolve_files(path=str(tmp_path / name))
        assert (f.format, f.num_rows) == ("arrow", 50)
        _assert_subset_matches([f], rows)
        with pytest.raises(DataSourceError, match="not found; columns present"):
            list(read_rows(f, np.array([1]), ["text"]))


def test_save_to_disk_dataset_and_datasetdict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _rows(40)
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    files = resolve_files(path=str(tmp_path / "ds"), split="train")
    assert [f.format for f in files] == ["arrow"] * 3 and sum(f.num_rows for f in files) == len(ds)
    assert [Path(f.path).name for f in files] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    _assert_subset_matches(files, ds.to_list())

    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(_rows(7, 100))})
    dd.save_to_disk(str(tmp_path / "dd"))
    test_files = resolve_files(path=str(tmp_path / "dd"), split="test")
    assert sum(f.num_rows for f in test_files) == 7
    _assert_subset_matches(test_files, dd["test"].to_list())
    with pytest.raises(DataSourceError, match=r"available splits: \['train', 'test'\]"):
        resolve_files(path=str(tmp_path / "dd"), split="validation")


def test_sharegpt_file_end_to_end(tmp_path):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "system": ""}
    (tmp_path / "sg.jsonl").write_text(json.dumps(row) + "\n")
    (f,) = resolve_files(path=str(tmp_path / "sg.jsonl"))
    ((_, raw),) = read_rows(f, np.array([0]), None)
    assert normalize(raw, "auto", ColumnMap.sharegpt()) == {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "chat_template_kwargs": {}}


def test_fsspec_url_file_and_glob():
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    rows = _rows(6)
    fs.pipe("/raysft-test/a.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:4]).encode())
    with fs.open("/raysft-test/b.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows[4:]), f)
    try:
        files = resolve_files(path="memory://raysft-test/*")
        assert [(f.path, f.format, f.num_rows) for f in files] == [
            ("memory:///raysft-test/a.jsonl", "jsonl", 4), ("memory:///raysft-test/b.parquet", "parquet", 2)]
        _assert_subset_matches(files, rows)
    finally:
        fs.rm("/raysft-test", recursive=True)

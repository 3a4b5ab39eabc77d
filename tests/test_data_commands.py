"""`raysft data preview` / `raysft data stats`, run in-process through `raysft.cli.main`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from raysft.cli import main
from raysft.config import compose

ASSETS = Path(__file__).resolve().parent / "assets"

MASKED = re.compile(r"«(.*?)»", re.S)


def _first_example_messages() -> list[dict]:
    """The messages of the first good row of the first train unit, read as preview reads them."""
    from raysft.data.pipeline import PrepareUnit, build_spec
    from raysft.train.model import tokenizer_path

    cfg = compose([])
    spec = build_spec(cfg.data, tokenizer_path(cfg.model))
    pu = PrepareUnit(spec)
    _, _, examples, _ = pu.read_unit(spec.unit_plan().units("train")[0])
    return next(e for e in examples if e is not None)["messages"]


def test_preview_marks_user_masked_and_assistant_trained(capsys):
    assert main(["data", "preview", "--no-color", "--rows", "2"]) == 0
    out = capsys.readouterr().out
    blocks = re.split(r"^── example \d+/2 .*$", out, flags=re.M)
    assert len(blocks) == 3, out  # header + 2 examples
    first = blocks[1].split("── packed row")[0]
    masked = "".join(MASKED.findall(first))
    trained = MASKED.sub("", first)
    assert "\x1b[" not in out  # --no-color: no ANSI codes
    msgs = _first_example_messages()
    user = next(m["content"] for m in msgs if m["role"] == "user")
    assistant = [m["content"] for m in msgs if m["role"] == "assistant"][-1]
    assert user.strip() and user.strip() in masked and user.strip() not in trained
    assert assistant.strip()[-40:] in trained and assistant.strip()[-40:] not in masked
    assert "<|im_start|>user" in masked and "<|im_start|>system" in masked
    assert "<|im_start|>assistant" in trained
    assert re.search(r"source \S+ · \S+ row \d+ · [\d,]+ tokens, [\d,]+ trained", out)
    assert re.search(r"── packed row 0 of \d+ .*\d+ sequence\(s\), [\d,]+ tokens \+ [\d,]+ pad = 512", out)
    assert "sequence lengths: [" in out and "sources:" in out


@pytest.mark.parametrize("argv", [
    ["data", "preview", "data.max_lenght=3"],          # unknown key
    ["data", "preview", "data.max_length=abc"],        # wrong type
    ["data", "stats", "data=no_such_preset"],          # unknown preset
    ["data", "preview", "--rows"],                     # missing value
    ["data", "preview", "--colour"],                   # unknown option
    ["data", "explain"],                               # unknown command
])
def test_bad_usage_exits_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: raysft data preview" in err and "raysft: error:" in err


@pytest.mark.ray
def test_stats_writes_consistent_json_and_png(ray_cluster, tmp_path, capsys):
    assert main(["data", "stats", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"packing efficiency \d+\.\d%", out)
    assert str(tmp_path / "stats.json") in out and str(tmp_path / "mixture.png") in out

    st = json.loads((tmp_path / "stats.json").read_text())
    assert set(st["sources"]) == {"gsm8k_think", "glaive_toolcall_en_demo_no_think"}
    for name, s in st["sources"].items():
        assert name in out
        # the default mixture has no weight > 1, so every selected row is accounted for exactly once
        assert (s["kept"] + s["dropped_too_long"] + sum(s["bad"].values()) + sum(s["duplicates"].values())
                == s["selected"] > 0), name
        assert 0 < s["trained_tokens"] < s["tokens"]
        assert s["truncated"] <= s["kept"]
    tot = st["totals"]
    assert tot["tokens"] == st["train_packed_tokens"] == sum(s["tokens"] for s in st["sources"].values())
    assert st["packing_efficiency"] == pytest.approx(st["train_packed_tokens"] / (st["train_packed_rows"] * st["max_length"]))
    assert 0.5 < st["packing_efficiency"] <= 1.0
    assert f"{st['packing_efficiency']:.1%}" in out
    assert sum(sh["tokens"] for sh in st["shares"].values()) == pytest.approx(1.0)
    assert sum(sh["trained_tokens"] for sh in st["shares"].values()) == pytest.approx(1.0)
    assert st["eval_packed_rows"] >= 1
    png = (tmp_path / "mixture.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


@pytest.mark.ray
def test_stats_on_malformed_data_exits_3_without_traceback(ray_cluster, tmp_path, capsys):
    src = f"data.dataset_mixture.datasets=[{{path:'{ASSETS / 'bad_rows.jsonl'}'}}]"
    assert main(["data", "stats", "--out", str(tmp_path), src, "data.dataset_mixture.test_split_size=0"]) == 3
    err = capsys.readouterr().err
    assert "malformed" in err and "data.max_bad_fraction" in err and "Traceback" not in err
    assert not (tmp_path / "stats.json").exists()

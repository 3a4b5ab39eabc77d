"""Row validation and normalization (raysft.data.validate): fast, pure, no Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from raysft.data.sources import read_rows, resolve_files
from raysft.data.validate import (
    LATER_STAGE_REASONS, REASONS, ColumnMap, DuplicateFilter, RowError, _DigestSet, detect_format, normalize,
)

ASSETS = Path(__file__).parent / "assets"
Q, A = "What is the capital of France?", "The capital of France is Paris."


def _user_assistant(**extra):
    return {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}], **extra}


def _run_bad_rows() -> dict[int, dict | RowError]:
    """Read every line of the bad-rows asset and validate it in file order, as the pipeline does."""
    (f,) = resolve_files(path=str(ASSETS / "bad_rows.jsonl"))
    dups, out = DuplicateFilter(), {}
    for row, raw in read_rows(f, np.arange(f.num_rows), None):
        res = raw if isinstance(raw, RowError) else normalize(raw, "auto", ColumnMap())
        if not isinstance(res, RowError):
            res = dups.check(raw) or res
        out[row + 1] = res
    return out


def test_bad_rows_match_expected():
    expected = {e["line"]: e for e in json.loads((ASSETS / "expected.json").read_text())}
    got = _run_bad_rows()
    assert sorted(got) == sorted(expected)
    for line, exp in expected.items():
        res = got[line]
        if exp["category"] in LATER_STAGE_REASONS:
            # too_long is the tokenizer stage's verdict: the validator must pass the row through intact.
            assert isinstance(res, dict), f"line {line}: {res}"
            assert sum(len(m["content"]) for m in res["messages"]) > 65_536
        elif exp["keep"]:
            assert isinstance(res, dict), f"line {line} should be kept, got {res}"
        else:
            assert isinstance(res, RowError), f"line {line} ({exp['category']}) was kept"
            assert res.reason == exp["category"], f"line {line}: {res}"
            assert res.reason in REASONS
            assert res.field and res.field in res.message, f"line {line}: message must name the field: {res}"


def test_bad_rows_messages_are_actionable():
    got = _run_bad_rows()
    assert "did you mean 'assistant'" in got[8].message  # 'Assistant'
    assert "parts" in got[12].message  # list of {type,text} parts
    assert got[24].field == "chat_template_kwargs.thinking_budget"
    assert got[18].field == "line 18" and "UTF-8" in got[18].message


def test_normalized_forms_of_the_control_rows():
    got = _run_bad_rows()
    assert got[1] == {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
                      "chat_template_kwargs": {"enable_thinking": False}}  # nulls dropped
    assert [m["role"] for m in got[2]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert got[2]["chat_template_kwargs"] == {"enable_thinking": True}


def test_passthrough_keys_are_ignored():
    out = normalize(_user_assistant(id=7, defect="x", source="s", anything={"a": 1}), "messages", ColumnMap())
    assert set(out) == {"messages", "chat_template_kwargs"}


def test_sharegpt_mapping():
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": Q},
                             {"from": "function_call", "value": '{"name": "f"}'}, {"from": "observation", "value": "{}"},
                             {"from": "gpt", "value": A}]}
    cmap = ColumnMap.sharegpt()
    assert detect_format(row, cmap) == "messages"
    out = normalize(row, "auto", cmap)
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert out["messages"][-1] == {"role": "assistant", "content": A}
    assert ColumnMap.named("sharegpt") == cmap
    # The same row under the default map: no 'messages' column; a 'from: human' row hints at ShareGPT.
    assert normalize(row, "auto", ColumnMap()).reason == "missing_messages"
    err = normalize({"messages": [{"role": "human", "content": Q}]}, "messages", ColumnMap())
    assert err.reason == "unknown_role" and "column_map=sharegpt" in err.message
    err = normalize({"conversations": [{"from": "GPT", "value": A}]}, "messages", cmap)
    assert err.field == "conversations[0].from" and "did you mean 'gpt'" in err.message


def test_prompt_completion_and_text():
    cmap = ColumnMap()
    assert normalize({"prompt": "2+2=", "completion": "4"}, "auto", cmap) == {
        "prompt": "2+2=", "completion": "4", "chat_template_kwargs": {}}
    conv = {"prompt": [{"role": "user", "content": Q}], "completion": [{"role": "assistant", "content": A}],
            "chat_template_kwargs": {"enable_thinking": False}}
    assert normalize(conv, "prompt_completion", cmap)["completion"] == [{"role": "assistant", "content": A}]
    assert normalize({"prompt": "q", "completion": [{"role": "assistant", "content": A}]}, "auto", cmap).reason == "wrong_type_column"
    assert normalize({"prompt": "q", "completion": " "}, "auto", cmap).reason == "empty_completion"
    assert normalize({"prompt": "q"}, "prompt_completion", cmap).reason == "missing_column"
    assert normalize({"prompt": [{"role": "user", "content": Q}], "completion": [{"role": "user", "content": Q}]},
                     "prompt_completion", cmap).reason == "no_assistant_turn"
    assert normalize({"text": "hello"}, "auto", cmap) == {"text": "hello"}
    assert normalize({"text": 3}, "text", cmap).reason == "wrong_type_column"
    assert normalize({"text": ""}, "text", cmap).reason == "empty_text"
    with pytest.raises(ValueError, match="data.format"):
        normalize({"text": "x"}, "chat", cmap)


def test_kwargs_rules():
    cmap = ColumnMap()
    ok = normalize(_user_assistant(chat_template_kwargs={"xml_tools": ['{"name": "f"}'], "python_tools": None}), "messages", cmap)
    assert ok["chat_template_kwargs"] == {"xml_tools": ['{"name": "f"}']}
    bad = _user_assistant(chat_template_kwargs={"reasoning_effort": "high"})
    assert normalize(bad, "messages", cmap).reason == "bad_kwargs"
    assert normalize(bad, "messages", cmap, allowed_kwargs={"reasoning_effort"})["chat_template_kwargs"] == {"reasoning_effort": "high"}
    assert normalize(_user_assistant(chat_template_kwargs={"xml_tools": [{"name": "f"}]}), "messages", cmap).reason == "bad_kwargs"


def test_assistant_rules():
    cmap = ColumnMap()
    two = {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": ""},
                        {"role": "user", "content": Q}, {"role": "assistant", "content": A}]}
    assert isinstance(normalize(two, "messages", cmap), dict)  # one non-empty assistant turn is enough
    blank = {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": " \n"}]}
    assert normalize(blank, "messages", cmap).reason == "empty_assistant"
    assert normalize({"messages": [{"role": "user", "content": Q}, "hi"]}, "messages", cmap).field == "messages[1]"


def test_duplicate_filter_content_and_ids():
    dups = DuplicateFilter()
    assert dups.check(_user_assistant(chat_template_kwargs={"enable_thinking": False, "xml_tools": None})) is None
    # Same content, null kwargs omitted, no id: still the same row.
    err = dups.check(_user_assistant(chat_template_kwargs={"enable_thinking": False}))
    assert err.reason == "duplicate_content" and err.field == "messages"
    assert dups.check(_user_assistant(chat_template_kwargs={"enable_thinking": True})) is None
    assert dups.check({"id": "a", "text": "x"}) is None
    assert dups.check({"id": "a", "text": "y"}).reason == "duplicate_id"
    assert dups.check({"id": "b", "text": "y"}) is None  # the rejected row above did not record its content
    assert len(dups) == 4


def test_digest_set_is_exact_across_merges():
    rng = np.random.default_rng(0)
    buf = rng.bytes(16 * 71_000)
    digests = [buf[i:i + 16] for i in range(0, 16 * 70_000, 16)]  # > one merge (65,536)
    absent = [buf[i:i + 16] for i in range(16 * 70_000, len(buf), 16)]
    # Digests with trailing NULs: numpy 'S16' strips them, which must not create false matches.
    tricky = [b"\x00" * 16, b"\x00" * 15 + b"\x01", b"\x01" + b"\x00" * 15, b"\x01" + b"\x00" * 14 + b"\x02"]
    s = _DigestSet()
    for d in tricky[:2] + digests:
        s.add(d)
    assert s._sorted.size > 0 and len(s) == 70_002
    assert all(d in s for d in digests[::97]) and tricky[0] in s and tricky[1] in s
    assert tricky[2] not in s and tricky[3] not in s
    assert not any(d in s for d in absent)


@pytest.mark.skipif(not os.path.isdir(ASSETS.parent.parent.parent / "shared" / "data" / "smoltalk2-mini"),
                    reason="needs ../shared/data/smoltalk2-mini")
def test_every_smoltalk2_mini_row_is_valid():
    root = str(ASSETS.parent.parent.parent / "shared" / "data" / "smoltalk2-mini")
    for config, split in [("SFT", "glaive_toolcall_en_demo_no_think"), ("SFT", "reason_tool_use_demo_think"),
                          ("Mid", "gsm8k_chained_multiturn_long")]:
        for f in resolve_files(id="HuggingFaceTB/smoltalk2", data_root=root, config=config, split=split):
            for _, raw in read_rows(f, np.arange(f.num_rows), ["messages", "chat_template_kwargs"] if config == "SFT" else None):
                out = normalize(raw, "auto", ColumnMap())
                assert isinstance(out, dict), (split, out)

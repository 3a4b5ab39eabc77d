"""raysft.data.render: token ids + loss labels from normalized rows (CPU, no Ray, no network).

Expected strings are hand-checked against the templates in raysft/assets/templates/. The SFT
template's assistant turn is (generation markers included):
  <|im_start|>assistant\\n<think>\\n\\n</think>\\n{content}<|im_end|>\\n   (enable_thinking=False)
  <|im_start|>assistant\\n{content}<|im_end|>\\n                          (enable_thinking=True)
"""

from __future__ import annotations

import datetime
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysft.data.render import IGNORE_INDEX, ChatRenderer, Rendered, format_masked

ASSETS = Path(__file__).resolve().parents[1] / "raysft" / "assets"
TOKENIZER_DIR = ASSETS / "tokenizer" / "smollm3"
SFT_TEMPLATE = (ASSETS / "templates" / "sft_chat_template.jinja").read_text()
MID_TEMPLATE = (ASSETS / "templates" / "mid_chat_template.jinja").read_text()
SAMPLE_SFT = ASSETS / "data" / "smoltalk2-sample" / "SFT"
DATE = datetime.date(2025, 3, 4)
EOS = "<|im_end|>"

# The mid template with {% generation %} markers around what the model generates after the
# generation prompt "<|im_start|>assistant\n": equivalent to MID_TEMPLATE for prefix_diff.
MID_TEMPLATE_MARKED = """\
{%- for message in messages -%}
{%- if message.role == "assistant" -%}
{{- "<|im_start|>assistant\\n" -}}
{%- generation -%}{{- message.content + "<|im_end|>" + "\\n" -}}{%- endgeneration -%}
{%- else -%}
{{- "<|im_start|>" + message.role + "\\n" + message.content + "<|im_end|>" + "\\n" -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|im_start|>assistant\\n" -}}{%- endif -%}"""


@pytest.fixture(scope="module")
def tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def sft(tok):
    return ChatRenderer(tok, SFT_TEMPLATE, date=DATE, eos_token=EOS)


@pytest.fixture(scope="module")
def mid(tok):
    return ChatRenderer(tok, MID_TEMPLATE, date=DATE, eos_token=EOS)


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def runs(tok, r: Rendered, trained: bool = True) -> list[str]:
    """Decoded contiguous runs of trained (or masked) tokens, in order."""
    keep = (r.labels != IGNORE_INDEX) == trained
    cuts = np.flatnonzero(np.diff(keep.astype(np.int8))) + 1
    return [decode(tok, r.input_ids[seg]) for seg in np.split(np.arange(len(keep)), cuts) if keep[seg[0]]]


def conv(*turns, **kwargs) -> dict:
    roles = {"s": "system", "u": "user", "a": "assistant", "t": "tool"}
    return {
        "messages": [{"role": roles[t[0]], "content": t[1]} for t in turns],
        "chat_template_kwargs": {"custom_instructions": None, "python_tools": None, "xml_tools": None, **kwargs},
    }


# ---------------------------------------------------------------- SFT template (generation markers)
def test_sft_no_think_with_system_exact_text_and_labels(tok, sft):
    r = sft.render(conv(("s", "Be brief."), ("u", "What is 2+2?"), ("a", "4"), enable_thinking=False))
    assert r.mask_method == "generation_markers"
    assert r.input_ids.dtype == np.int32 and r.labels.dtype == np.int32
    assert decode(tok, r.input_ids) == (
        "<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\nToday Date: 04 March 2025\n"
        "Reasoning Mode: /no_think\n\n## Custom Instructions\n\nBe brief.\n\n## Tools\n\n### XML Tools\n\nNone\n\n"
        "### Python Tools\n\nNone\n\n<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n4<|im_end|>\n"
    )
    assert runs(tok, r) == ["<|im_start|>assistant\n<think>\n\n</think>\n4<|im_end|>\n"]
    trained = r.labels != IGNORE_INDEX
    np.testing.assert_array_equal(r.labels[trained], r.input_ids[trained])  # labels are not shifted


def test_sft_thinking_row(tok, sft):
    r = sft.render(conv(("u", "What is 2+2?"), ("a", "<think>\nAdd them.\n</think>\n\n4"), enable_thinking=True))
    assert runs(tok, r) == ["<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n4<|im_end|>\n"]
    assert "Reasoning Mode: /think\n" in decode(tok, r.input_ids)
    think_id = tok.convert_tokens_to_ids("<think>")
    assert think_id in r.labels.tolist()  # <think> in content is the special token, and trained


def test_sft_multi_turn_trains_every_assistant_turn_only(tok, sft):
    r = sft.render(conv(("u", "2+2?"), ("a", "4"), ("u", "3+3?"), ("a", "6"), enable_thinking=False))
    assert runs(tok, r) == [
        "<|im_start|>assistant\n<think>\n\n</think>\n4<|im_end|>\n",
        "<|im_start|>assistant\n<think>\n\n</think>\n6<|im_end|>\n",
    ]
    masked = runs(tok, r, trained=False)
    assert masked[1] == "<|im_start|>user\n3+3?<|im_end|>\n"
    assert masked[0].endswith("<|im_start|>user\n2+2?<|im_end|>\n")


def test_sft_tool_turns(tok, sft):
    tool = '{"name": "get_weather", "parameters": {"city": "string"}}'
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    r = sft.render(
        conv(("u", "Weather in Paris?"), ("a", call), ("t", '{"temp_c": 18}'), ("a", "It is 18 °C."),
             enable_thinking=False, xml_tools=[tool])
    )
    assert runs(tok, r) == [
        f"<|im_start|>assistant\n<think>\n\n</think>\n{call}<|im_end|>\n",
        "<|im_start|>assistant\n<think>\n\n</think>\nIt is 18 °C.<|im_end|>\n",
    ]
    masked = runs(tok, r, trained=False)
    assert masked[1] == '<|im_start|>user\n{"temp_c": 18}<|im_end|>\n'  # role tool renders as user, masked
    # NOTE: the recipe template prints the xml_tools *list* verbatim (Python repr), unlike the
    # tokenizer's own template, which iterates over it. Pinned here so a template change is noticed.
    assert f"### XML Tools\n\n['{tool}']\n\n" in masked[0]


def test_matches_apply_chat_template_on_sample_rows(tok):
    # Same ids and assistant mask as transformers (date = today, which apply_chat_template uses).
    r = ChatRenderer(tok, SFT_TEMPLATE, date=datetime.date.today(), eos_token=EOS)
    rows = []
    for name in ("gsm8k_think", "glaive_toolcall_en_demo_no_think"):
        rows += pq.read_table(next(SAMPLE_SFT.glob(f"{name}-*.parquet"))).slice(0, 20).to_pylist()
    for row, got in zip(rows, r.render_batch(rows)):
        kwargs = {k: v for k, v in row["chat_template_kwargs"].items() if v is not None}
        ref = tok.apply_chat_template(
            row["messages"], chat_template=SFT_TEMPLATE, return_assistant_tokens_mask=True, return_dict=True, **kwargs
        )
        ids = np.asarray(ref["input_ids"])
        np.testing.assert_array_equal(got.input_ids, ids)
        np.testing.assert_array_equal(got.labels, np.where(np.asarray(ref["assistant_masks"], bool), ids, -100))


# ---------------------------------------------------------------- templates without markers
def test_mid_template_prefix_diff_equals_marked_template(tok, mid):
    ex = conv(("s", "Be brief."), ("u", "2+2?"), ("a", "4"), ("u", "3+3?"), ("a", "6"))
    r = mid.render(ex)
    assert r.mask_method == "prefix_diff"
    assert decode(tok, r.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"
    )
    assert runs(tok, r) == ["4<|im_end|>\n", "6<|im_end|>\n"]
    marked = ChatRenderer(tok, MID_TEMPLATE_MARKED, date=DATE, eos_token=EOS).render(ex)
    assert marked.mask_method == "generation_markers"
    np.testing.assert_array_equal(marked.input_ids, r.input_ids)
    np.testing.assert_array_equal(marked.labels, r.labels)


def test_prefix_diff_on_sft_template_without_markers(tok):
    # Stripped markers: the generation prompt (header + empty think block) is not trained.
    stripped = SFT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    r = ChatRenderer(tok, stripped, date=DATE, eos_token=EOS).render(
        conv(("u", "2+2?"), ("a", "4"), ("u", "3+3?"), ("a", "6"), enable_thinking=False)
    )
    assert r.mask_method == "prefix_diff"
    assert runs(tok, r) == ["4<|im_end|>\n", "6<|im_end|>\n"]


def test_prefix_property_violations_raise(tok):
    drops_past_turns = (
        "{%- for m in messages -%}"
        "{%- if m.role == 'assistant' and not loop.last -%}{{ '<|im_start|>assistant\\n(elided)<|im_end|>\\n' }}"
        "{%- else -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )
    ex = conv(("u", "2+2?"), ("a", "4"), ("u", "3+3?"), ("a", "6"))
    with pytest.raises(ValueError, match="rewrites earlier turns"):
        ChatRenderer(tok, drops_past_turns, date=DATE).render(ex)
    odd_prompt = MID_TEMPLATE.replace('"<|im_start|>assistant\\n"', '"<|im_start|>assistant\\n<think>\\n"')
    with pytest.raises(ValueError, match="prefix property"):
        ChatRenderer(tok, odd_prompt, date=DATE).render(ex)


# ---------------------------------------------------------------- prompt-completion, text, all
def test_prompt_completion_strings(tok, sft):
    r = sft.render({"prompt": "Q: capital of France?\nA:", "completion": " Paris"})
    assert r.mask_method == "completion"
    assert decode(tok, r.input_ids) == "Q: capital of France?\nA: Paris<|im_end|>"
    assert runs(tok, r) == [" Paris<|im_end|>"]
    # eos already present: not doubled
    again = sft.render({"prompt": "Q: capital of France?\nA:", "completion": " Paris<|im_end|>"})
    assert again == r


def test_prompt_completion_conversational(tok, sft):
    ex = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "completion": [{"role": "assistant", "content": "4"}],
        "chat_template_kwargs": {"enable_thinking": False},
    }
    r = sft.render(ex)
    assert r.mask_method == "completion"
    # The generation prompt (header + empty think block) belongs to the prompt, as in TRL.
    assert runs(tok, r) == ["4<|im_end|>\n"]
    as_messages = sft.render(
        {"messages": ex["prompt"] + ex["completion"], "chat_template_kwargs": {"enable_thinking": False}}
    )
    np.testing.assert_array_equal(r.input_ids, as_messages.input_ids)

    completion_only = ChatRenderer(tok, SFT_TEMPLATE, date=DATE, loss="completion_only", eos_token=EOS)
    assert completion_only.render(ex) == r


def test_text_and_all(tok):
    r_all = ChatRenderer(tok, MID_TEMPLATE, date=DATE, loss="all", eos_token=EOS)
    r = r_all.render({"text": "Hello world"})
    assert r.mask_method == "all"
    assert decode(tok, r.input_ids) == "Hello world<|im_end|>"
    np.testing.assert_array_equal(r.labels, r.input_ids)
    m = r_all.render(conv(("u", "2+2?"), ("a", "4")))
    assert m.mask_method == "all"
    np.testing.assert_array_equal(m.labels, m.input_ids)


def test_loss_mode_mismatches_raise(tok, sft):
    with pytest.raises(ValueError, match="loss='all'"):
        sft.render({"text": "Hello world"})
    completion_only = ChatRenderer(tok, SFT_TEMPLATE, date=DATE, loss="completion_only")
    with pytest.raises(ValueError, match="completion_only"):
        completion_only.render(conv(("u", "2+2?"), ("a", "4")))
    with pytest.raises(ValueError, match="loss must be one of"):
        ChatRenderer(tok, SFT_TEMPLATE, date=DATE, loss="assistant")


# ---------------------------------------------------------------- errors, eos, date, batching
def test_zero_trained_tokens_raise(tok, sft):
    with pytest.raises(ValueError, match="zero trained tokens"):
        sft.render(conv(("u", "Hello?"), enable_thinking=False))
    no_eos = ChatRenderer(tok, SFT_TEMPLATE, date=DATE)
    with pytest.raises(ValueError, match="zero trained tokens"):
        no_eos.render({"prompt": "Q: hi\nA:", "completion": ""})


def test_missing_eos_in_assistant_span_raises(tok):
    r = ChatRenderer(tok, SFT_TEMPLATE, date=DATE, eos_token="</s>")
    with pytest.raises(ValueError, match="does not end with eos_token"):
        r.render(conv(("u", "2+2?"), ("a", "4")))


def test_date_pinning(tok, sft):
    ex = conv(("u", "2+2?"), ("a", "4"), enable_thinking=False)
    other = ChatRenderer(tok, SFT_TEMPLATE, date=datetime.date(2031, 12, 25), eos_token=EOS).render(ex)
    a = decode(tok, sft.render(ex).input_ids).split("\n")
    b = decode(tok, other.input_ids).split("\n")
    assert [(x, y) for x, y in zip(a, b) if x != y] == [("Today Date: 04 March 2025", "Today Date: 25 December 2031")]
    assert len(a) == len(b)
    twin = ChatRenderer(tok, SFT_TEMPLATE, date=DATE, eos_token=EOS)
    assert twin.render(ex) == sft.render(ex)
    # A pickled renderer (as Ray ships it to workers) renders identically.
    assert pickle.loads(pickle.dumps(sft)).render(ex) == sft.render(ex)


def test_render_batch_equals_render(tok, sft):
    batch = [
        conv(("s", "Be brief."), ("u", "2+2?"), ("a", "4"), enable_thinking=False),
        conv(("u", "2+2?"), ("a", "<think>\nx\n</think>\n\n4"), ("u", "ok"), ("a", "<think>\n</think>\n\nbye"),
             enable_thinking=True),
        {"prompt": "Q: hi\nA:", "completion": " hello"},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]},
    ]
    assert sft.render_batch(batch) == [sft.render(x) for x in batch]
    bad = conv(("u", "no answer"))
    out = sft.render_batch([batch[0], bad, batch[2]], on_error="return")
    assert out[0] == sft.render(batch[0]) and out[2] == sft.render(batch[2])
    assert isinstance(out[1], ValueError)
    with pytest.raises(ValueError):
        sft.render_batch([batch[0], bad])


def test_format_masked(tok, mid):
    r = mid.render(conv(("u", "2+2?"), ("a", "4")))
    assert format_masked(tok, r.input_ids, r.labels, color=False) == (
        "«<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n»4<|im_end|>\n"
    )
    assert format_masked(tok, r.input_ids, r.labels) == (
        "\x1b[2m<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n\x1b[0m4<|im_end|>\n"
    )
    assert format_masked(tok, r.input_ids, r.labels, masked_open="[", masked_close="]").startswith("[<|im_start|>")


def test_template_error_is_a_bad_row(tok):
    refuses_tools = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="failed to render the row: no tools"):
        ChatRenderer(tok, refuses_tools, date=DATE).render(conv(("t", "x"), ("a", "y")))

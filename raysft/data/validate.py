"""Is a raw row trainable, and in which normalized form.

:func:`normalize` turns one raw row (any supported layout) into the example dict the renderer
consumes, or a :class:`RowError` whose ``reason`` is a stable key (counted per source in the run's
data report) and whose ``message`` tells the user what to fix. :class:`DuplicateFilter` flags
repeated rows. Pure Python: runs the same on the driver, in Ray Data tasks and in unit tests.

NOTE: rejection is strict by design. A row the chat template would render differently from what
its author meant (wrong-case role, unknown template kwarg) is dropped and counted, not guessed at.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import numpy as np

ROLES = ("system", "user", "assistant", "tool")

# Chat-template kwargs of the SmolLM3 SFT template and the type each must have (None is allowed).
SMOLLM3_KWARGS: dict[str, str] = {
    "enable_thinking": "bool", "custom_instructions": "str", "xml_tools": "list[str]", "python_tools": "list[str]",
}

REASONS: dict[str, str] = {
    # file level (produced by sources.read_rows for jsonl)
    "invalid_utf8": "line is not valid UTF-8",
    "invalid_json": "line is not valid JSON",
    "not_an_object": "line is valid JSON but not an object",
    "blank_line": "line is empty",
    # row level (normalize)
    "missing_messages": "no messages column (or it is null)",
    "empty_messages": "messages is an empty list",
    "wrong_type_messages": "messages is not a list",
    "malformed_message": "a message is not an object with role and content",
    "unknown_role": "a role is not system/user/assistant/tool after aliasing",
    "non_string_content": "a message content is not a string",
    "no_assistant_turn": "no assistant message to learn from",
    "empty_assistant": "every assistant message is empty",
    "missing_column": "prompt/completion/text column absent or null",
    "wrong_type_column": "prompt/completion/text has the wrong type",
    "empty_completion": "completion is empty",
    "empty_text": "text is empty",
    "bad_kwargs": "chat_template_kwargs is not an object of known keys with the right types",
    # dataset level (DuplicateFilter)
    "duplicate_id": "id seen in an earlier row",
    "duplicate_content": "same content as an earlier row",
    # token level: assigned later by the tokenizing stage, never by normalize
    "too_long": "longer than max_length tokens after the chat template",
}
LATER_STAGE_REASONS = frozenset({"too_long"})


@dataclass(frozen=True)
class RowError:
    reason: str
    """Stable category key, one of :data:`REASONS`."""
    field: str
    """Where in the row, e.g. ``messages[2].role`` (or ``line 18`` for a line that is not a row)."""
    message: str
    """What is wrong and what to do, for a human."""


@dataclass(frozen=True)
class ColumnMap:
    """Column and key names of a dataset layout; the defaults are smoltalk2's / TRL's."""

    messages: str = "messages"
    role_key: str = "role"
    content_key: str = "content"
    role_aliases: dict[str, str] = field(default_factory=dict)
    """Source role -> one of ROLES, applied before the role check (case-sensitive)."""
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"
    chat_template_kwargs: str = "chat_template_kwargs"

    @classmethod
    def sharegpt(cls) -> "ColumnMap":
        """ShareGPT / LLaMA-Factory layout: ``conversations: [{from, value}]``."""
        return cls(messages="conversations", role_key="from", content_key="value", role_aliases=dict(SHAREGPT_ROLES))

    @classmethod
    def named(cls, name: str) -> "ColumnMap":
        """The preset named by ``data.column_map`` (``default`` | ``sharegpt``)."""
        presets = {"default": cls, "sharegpt": cls.sharegpt}
        if name not in presets:
            raise ValueError(f"data.column_map={name!r} is not valid; choose one of {list(presets)}")
        return presets[name]()


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool",
                  "function": "tool", "observation": "tool", "function_call": "assistant"}

Format = Literal["auto", "messages", "prompt_completion", "text"]


def detect_format(keys: Iterable[str], cmap: ColumnMap = ColumnMap()) -> str | None:
    """Which layout a row (or a file schema) is in, by the columns present; None if none fits."""
    keys = set(keys)
    if cmap.messages in keys:
        return "messages"
    if cmap.prompt in keys and cmap.completion in keys:
        return "prompt_completion"
    if cmap.text in keys:
        return "text"
    return None


def normalize(raw: dict, fmt: Format = "auto", cmap: ColumnMap = ColumnMap(),
              allowed_kwargs: Iterable[str] = ()) -> dict | RowError:
    """One raw row -> ``{"messages", "chat_template_kwargs"}`` | ``{"prompt", "completion",
    "chat_template_kwargs"}`` | ``{"text"}``, or a RowError. Other keys (id, source, ...) are ignored.

    ``fmt="auto"`` picks by the columns present (messages, then prompt+completion, then text); a
    caller should detect once per source (:func:`detect_format` on the schema) so one odd row
    cannot switch layouts. ``allowed_kwargs`` adds template kwargs (any value type) to SMOLLM3_KWARGS.
    """
    if fmt == "auto":
        fmt = detect_format(raw, cmap)
        if fmt is None:
            return RowError("missing_messages", cmap.messages,
                            f"row has no {cmap.messages!r} (nor {cmap.prompt!r}+{cmap.completion!r}, nor {cmap.text!r}) "
                            f"column; keys present: {sorted(raw)}. Set data.column_map / data.format for this layout")
    if fmt == "text":
        text = raw.get(cmap.text)
        if text is None:
            return RowError("missing_column", cmap.text, f"{cmap.text!r} is missing or null; every row needs a string")
        if not isinstance(text, str):
            return RowError("wrong_type_column", cmap.text, f"{cmap.text!r} is {_a(text)}, expected a string")
        if not text.strip():
            return RowError("empty_text", cmap.text, f"{cmap.text!r} is empty; drop the row or fill it")
        return {"text": text}

    kwargs = _check_kwargs(raw.get(cmap.chat_template_kwargs), cmap.chat_template_kwargs, set(allowed_kwargs))
    if isinstance(kwargs, RowError):
        return kwargs
    if fmt == "messages":
        msgs = _check_messages(raw.get(cmap.messages, None), cmap.messages, cmap, need_assistant=True)
        return msgs if isinstance(msgs, RowError) else {"messages": msgs, "chat_template_kwargs": kwargs}
    if fmt == "prompt_completion":
        out: dict[str, Any] = {}
        for col, key, need in ((cmap.prompt, "prompt", False), (cmap.completion, "completion", True)):
            value = raw.get(col)
            if value is None:
                return RowError("missing_column", col, f"{col!r} is missing or null; prompt-completion rows need both columns")
            if isinstance(value, str):
                if need and not value.strip():
                    return RowError("empty_completion", col, f"{col!r} is empty; there is nothing to learn from this row")
                out[key] = value
            elif isinstance(value, list):
                checked = _check_messages(value, col, cmap, need_assistant=need)
                if isinstance(checked, RowError):
                    return checked
                out[key] = checked
            else:
                return RowError("wrong_type_column", col, f"{col!r} is {_a(value)}; expected a string or a list of messages")
        if type(out["prompt"]) is not type(out["completion"]):
            return RowError("wrong_type_column", cmap.completion, f"{cmap.prompt!r} and {cmap.completion!r} must both be "
                            f"strings or both be message lists (got {_tname(out['prompt'])} and {_tname(out['completion'])})")
        out["chat_template_kwargs"] = kwargs
        return out
    raise ValueError(f"data.format={fmt!r} is not valid; choose one of auto, messages, prompt_completion, text")


def _tname(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _a(v: Any) -> str:
    """'a str', 'an int', 'null' -- for messages."""
    name = _tname(v)
    return name if v is None else ("an " if name[0] in "aeiou" else "a ") + name


def _check_messages(msgs: Any, col: str, cmap: ColumnMap, *, need_assistant: bool) -> list[dict] | RowError:
    if msgs is None:
        return RowError("missing_messages", col, f"{col!r} is missing or null; each row needs a list of messages")
    if not isinstance(msgs, (list, tuple)):
        return RowError("wrong_type_messages", col, f"{col!r} is {_a(msgs)}, expected a list of "
                        f"{{{cmap.role_key!r}, {cmap.content_key!r}}} objects")
    if not msgs:
        return RowError("empty_messages", col, f"{col!r} is an empty list; drop the row or fill it")
    out = []
    for i, m in enumerate(msgs):
        where = f"{col}[{i}]"
        if not isinstance(m, dict):
            return RowError("malformed_message", where, f"{where} is {_a(m)}, expected an object with "
                            f"{cmap.role_key!r} and {cmap.content_key!r}")
        for key in (cmap.role_key, cmap.content_key):
            if key not in m:
                return RowError("malformed_message", f"{where}.{key}", f"{where}.{key} is missing (keys present: {sorted(m)}); "
                                f"every message needs {cmap.role_key!r} and {cmap.content_key!r}")
        role, content = m[cmap.role_key], m[cmap.content_key]
        if not isinstance(role, str):
            return RowError("malformed_message", f"{where}.{cmap.role_key}", f"{where}.{cmap.role_key} is {_a(role)}, expected a string")
        role = cmap.role_aliases.get(role, role)
        if role not in ROLES:
            return RowError("unknown_role", f"{where}.{cmap.role_key}", _unknown_role_message(where, cmap, m[cmap.role_key]))
        if not isinstance(content, str):
            hint = ("a list of {type, text} parts (OpenAI multimodal style); join the text parts into one string"
                    if isinstance(content, list) else f"{_a(content)}; use a string ('' for none)")
            return RowError("non_string_content", f"{where}.{cmap.content_key}", f"{where}.{cmap.content_key} is {hint}")
        out.append({"role": role, "content": content})
    if need_assistant:
        assistant = [i for i, m in enumerate(out) if m["role"] == "assistant"]
        if not assistant:
            return RowError("no_assistant_turn", col, f"{col!r} has no assistant message (roles: "
                            f"{[m['role'] for m in out]}); there is nothing to learn from this row")
        if not any(out[i]["content"].strip() for i in assistant):
            where = f"{col}[{assistant[-1]}].{cmap.content_key}"
            return RowError("empty_assistant", where, f"{where} is empty, as is every assistant message in {col!r}; "
                            f"there is nothing to learn from this row: drop it or fill the reply")
    return out


def _unknown_role_message(where: str, cmap: ColumnMap, role: str) -> str:
    msg = f"{where}.{cmap.role_key} is {role!r}; allowed roles are {', '.join(ROLES)}"
    lower = role.lower()
    if lower in ROLES or lower in cmap.role_aliases:  # roles are case-sensitive, as in the templates
        return msg + f" (case-sensitive): did you mean {lower!r}?"
    if not cmap.role_aliases and lower in SHAREGPT_ROLES:
        return msg + f"; {role!r} is a ShareGPT role: set data.column_map=sharegpt (maps it to {SHAREGPT_ROLES[lower]!r})"
    return msg + "; map other roles with ColumnMap.role_aliases"


def _check_kwargs(kw: Any, col: str, extra: set[str]) -> dict | RowError:
    if kw is None:
        return {}
    if not isinstance(kw, dict):
        return RowError("bad_kwargs", col, f"{col!r} is {_a(kw)}, expected an object like {{\"enable_thinking\": false}}")
    out = {}
    for key, value in kw.items():
        where = f"{col}.{key}"
        if key not in SMOLLM3_KWARGS and key not in extra:
            return RowError("bad_kwargs", where, f"{where}: unknown chat template kwarg; allowed: "
                            f"{sorted(set(SMOLLM3_KWARGS) | extra)} (add it to allowed_kwargs if your template uses it)")
        if value is None:
            continue  # null means "not set": the template default applies
        want = SMOLLM3_KWARGS.get(key)
        ok = (want is None or (want == "bool" and isinstance(value, bool)) or (want == "str" and isinstance(value, str))
              or (want == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value)))
        if not ok:
            hint = ""
            if want == "list[str]":
                hint = "; wrap it in a list" if isinstance(value, str) else "; serialize each tool schema with json.dumps"
            return RowError("bad_kwargs", where, f"{where} is {value!r:.60} ({_tname(value)}), expected {want} or null{hint}")
        out[key] = value
    return out


# ----------------------------------------------------------------------------- duplicates


class _DigestSet:
    """A set of 16-byte digests in ~16-30 bytes each: a sorted numpy array plus a small recent set.

    A Python set of bytes costs ~100 bytes per entry; at 10^8 rows that is 10 GB, this is ~2 GB.
    NOTE: numpy 'S16' strips trailing NUL bytes on comparison; harmless here because all digests
    have the same length, so two digests compare equal only if they are identical.
    """

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype="S16")
        self._recent: set[bytes] = set()

    def __contains__(self, d: bytes) -> bool:
        if d in self._recent:
            return True
        if not self._sorted.size:
            return False
        key = np.array([d], dtype="S16")
        i = int(np.searchsorted(self._sorted, key)[0])
        return i < self._sorted.size and bool(self._sorted[i:i + 1] == key)

    def add(self, d: bytes) -> None:
        self._recent.add(d)
        # Merge when the recent set reaches 1/8 of the sorted part: amortized O(log n) re-sorts.
        if len(self._recent) >= max(1 << 16, self._sorted.size // 8):
            self._sorted = np.sort(np.concatenate([self._sorted, np.array(list(self._recent), dtype="S16")]))
            self._recent = set()

    def __len__(self) -> int:
        return self._sorted.size + len(self._recent)


def _digest(obj: Any) -> bytes:
    canon = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.blake2b(canon.encode("utf-8"), digest_size=16).digest()


class DuplicateFilter:
    """Flags a row whose ``id`` (if present) was seen before, or whose exact content
    (messages/prompt/completion/text + kwargs, canonical JSON) was seen before; the first
    occurrence is kept. Keeps 16-byte blake2b digests only, so memory is ~tens of bytes per row.

    Call it in row order on rows that passed :func:`normalize`, so a rejected row's id cannot
    shadow a later valid one. Pass raw rows (with the same ``cmap``) or normalized ones (default
    map). Null kwargs are ignored in the content, so ``{"xml_tools": null}`` equals ``{}``.
    """

    def __init__(self, cmap: ColumnMap = ColumnMap()) -> None:
        self.cmap = cmap
        self._ids = _DigestSet()
        self._contents = _DigestSet()

    def check(self, raw: dict) -> RowError | None:
        c = self.cmap
        content = {k: raw[k] for k in (c.messages, c.prompt, c.completion, c.text) if k in raw}
        kw = raw.get(c.chat_template_kwargs)
        content["kwargs"] = {k: v for k, v in kw.items() if v is not None} if isinstance(kw, dict) else kw
        hc = _digest(content)
        rid = raw.get("id")
        hid = _digest(["id", rid]) if rid is not None else None
        if hid is not None and hid in self._ids:
            return RowError("duplicate_id", "id", f"id {rid!r} was already used by an earlier row; "
                            f"the first occurrence is kept (make ids unique, or drop the column)")
        if hc in self._contents:
            where = next((k for k in (c.messages, c.prompt, c.text) if k in raw), "content")
            return RowError("duplicate_content", where, f"{where} (with its chat_template_kwargs) repeats an earlier "
                            f"row exactly; the first occurrence is kept")
        if hid is not None:
            self._ids.add(hid)
        self._contents.add(hc)
        return None

    def __len__(self) -> int:
        """Distinct rows accepted so far."""
        return len(self._contents)

"""Render one normalized training example into token ids plus loss labels.

Pure and CPU-only (numpy + a fast tokenizer; no Ray, no torch), so it runs inside Ray Data map
tasks and in unit tests alike. Three row kinds come in (already validated):

- conversational      ``{"messages": [...], "chat_template_kwargs": {...}}``
- prompt-completion   ``{"prompt": str | messages, "completion": str | messages, "chat_template_kwargs": {...}}``
- language modelling  ``{"text": str}``

Every row becomes ``(text, character spans to train)``; a batch of texts is then tokenized in ONE
fast-tokenizer call and each token whose character range overlaps a span is trained. This is the
rule transformers uses for ``return_assistant_tokens_mask``, so our masks equal its masks.

``labels`` are NOT shifted: ``labels[i]`` is the target for position ``i`` exactly as HF causal-LM
models expect (they shift internally); ``-100`` means "not trained".

NOTE: rendering uses transformers' own compiled chat-template environment (same sandbox,
``trim_blocks``/``lstrip_blocks``, ``tojson`` filter and ``{% generation %}`` tracker as
``apply_chat_template``), but calls the compiled template directly instead of the public
``render_jinja_template``: that function passes every template kwarg through
``_plain_template_data``, which turns a callable into the string ``"<function>"``, so a pinned
``strftime_now`` cannot be passed through it (checked on transformers 5.23 and 5.24).
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import re
from typing import Any, Literal, Sequence

import jinja2
import numpy as np

try:  # NOTE: private helpers; tests/test_render.py pins their behaviour against apply_chat_template.
    from transformers.utils.chat_template_utils import (
        _compile_jinja_template,
        _render_with_assistant_indices,
    )
except ImportError as exc:  # pragma: no cover - only on an incompatible transformers
    raise ImportError(
        "raysft.data.render needs transformers' chat-template helpers "
        "(_compile_jinja_template, _render_with_assistant_indices); install transformers>=5.23"
    ) from exc

IGNORE_INDEX = -100
LossMode = Literal["assistant_only", "completion_only", "all"]
_LOSS_MODES = ("assistant_only", "completion_only", "all")
# The same test transformers uses to decide whether a template supports assistant masks.
_GENERATION_RE = re.compile(r"\{\%-?\s*generation\s*-?\%\}")


@dataclasses.dataclass(frozen=True, eq=False)
class Rendered:
    input_ids: np.ndarray  # int32, shape (n,)
    labels: np.ndarray  # int32, shape (n,); IGNORE_INDEX where not trained
    mask_method: str  # "generation_markers" | "prefix_diff" | "completion" | "all"

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_trained(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))

    # NOTE: the dataclass default __eq__ would compare arrays elementwise and fail on bool().
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Rendered):
            return NotImplemented
        return (
            self.mask_method == other.mask_method
            and np.array_equal(self.input_ids, other.input_ids)
            and np.array_equal(self.labels, other.labels)
        )

    __hash__ = None  # mutable arrays inside


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A row before tokenization: the full text and the [start, end) character spans to train."""

    text: str
    spans: tuple[tuple[int, int], ...]
    mask_method: str


class ChatRenderer:
    """Turns normalized rows into ``Rendered`` (token ids + labels); see the module docstring.

    Args:
        tokenizer: a transformers *fast* tokenizer (needs ``backend_tokenizer`` for offsets).
        chat_template: template source text; ``None`` uses ``tokenizer.chat_template``.
        date: the date ``strftime_now`` returns inside templates (SmolLM3 writes "Today Date: ..."
            into every system block), so every worker and every rerun tokenizes identically.
        loss: ``assistant_only`` trains assistant turns of conversations (and the completion of
            prompt-completion rows); ``completion_only`` trains completions of prompt-completion
            rows only; ``all`` trains every token. A row kind a mode cannot select from (``text``
            under a masked mode, ``messages`` under ``completion_only``) raises ValueError.
        eos_token: appended to string completions and to ``text`` rows when missing; for templated
            rows it is only *checked*: every trained assistant span must end with it.
    """

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str | None = None,
        *,
        date: datetime.date,
        loss: LossMode = "assistant_only",
        eos_token: str | None = None,
    ) -> None:
        if loss not in _LOSS_MODES:
            raise ValueError(f"loss must be one of {_LOSS_MODES}, got {loss!r}")
        if not isinstance(date, datetime.date):
            raise TypeError(f"date must be a datetime.date, got {type(date).__name__}")
        template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str) or not template:
            raise ValueError("no chat template: pass chat_template= or use a tokenizer that has one")
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise TypeError("ChatRenderer needs a fast tokenizer (character offsets come from its backend)")
        self.tokenizer = tokenizer
        self.chat_template = template
        self.date = date
        self.loss = loss
        self.eos_token = eos_token
        self.has_generation_markers = bool(_GENERATION_RE.search(template))
        self._compiled = _compile_jinja_template(template)
        # apply_chat_template exposes the special tokens (eos_token, ...) to templates; so do we.
        self._base_kwargs = dict(tokenizer.special_tokens_map)

    # A compiled jinja template does not pickle; Ray ships renderers to workers by pickling.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_compiled"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._compiled = _compile_jinja_template(self.chat_template)

    def _strftime_now(self, fmt: str) -> str:
        # Midnight of the pinned date: the templates only format the day, and a fixed time keeps
        # any other format deterministic too.
        return datetime.datetime.combine(self.date, datetime.time()).strftime(fmt)

    # ---------------------------------------------------------------- public API
    def render(self, example: dict) -> Rendered:
        return self.render_batch([example])[0]

    def render_batch(
        self, examples: Sequence[dict], *, on_error: Literal["raise", "return"] = "raise"
    ) -> list[Rendered]:
        """Render a batch with one tokenizer call. ``on_error="return"`` puts the ValueError of a bad
        row in its slot instead of raising, so a pipeline can count bad rows without losing the batch."""
        plans: list[_Plan | ValueError] = []
        for ex in examples:
            try:
                plans.append(self._plan(ex))
            except ValueError as err:
                if on_error == "raise":
                    raise
                plans.append(err)
        good = [p for p in plans if isinstance(p, _Plan)]
        backend = self.tokenizer.backend_tokenizer
        # NOTE: transformers sets truncation/padding on the shared backend per call; a leftover
        # setting from someone else's call must not truncate our rows.
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        encodings = iter(backend.encode_batch([p.text for p in good], add_special_tokens=False))
        out: list = []
        for plan in plans:
            if isinstance(plan, ValueError):
                out.append(plan)
                continue
            try:
                out.append(self._label(plan, next(encodings)))
            except ValueError as err:
                if on_error == "raise":
                    raise
                out.append(err)
        return out

    # ---------------------------------------------------------------- row -> plan
    def _plan(self, ex: dict) -> _Plan:
        kwargs = {k: v for k, v in (ex.get("chat_template_kwargs") or {}).items() if v is not None}
        if "messages" in ex:
            return self._plan_messages(ex["messages"], kwargs)
        if "prompt" in ex and "completion" in ex:
            return self._plan_prompt_completion(ex["prompt"], ex["completion"], kwargs)
        if "text" in ex:
            if self.loss != "all":
                raise ValueError(
                    f"a 'text' row has no prompt or assistant part to select with loss={self.loss!r}; use loss='all'"
                )
            text = self._with_eos(ex["text"])
            return _Plan(text, ((0, len(text)),), "all")
        raise ValueError(f"row has none of 'messages', 'prompt'+'completion', 'text' (keys: {sorted(ex)})")

    def _plan_messages(self, messages: list[dict], kwargs: dict) -> _Plan:
        if self.loss == "all":
            text, _ = self._render(messages, kwargs)
            return _Plan(text, ((0, len(text)),), "all")
        if self.loss == "completion_only":
            # NOTE: TRL ignores completion_only_loss for conversations and trains everything; we refuse
            # rather than silently train on prompts.
            raise ValueError(
                "loss='completion_only' needs prompt/completion rows; for 'messages' rows use loss='assistant_only'"
            )
        if self.has_generation_markers:
            text, spans = self._render(messages, kwargs, track=True)
            self._check_eos(text, spans)
            return _Plan(text, tuple(spans), "generation_markers")
        return self._plan_prefix_diff(messages, kwargs)

    def _plan_prefix_diff(self, messages: list[dict], kwargs: dict) -> _Plan:
        """Assistant spans for a template without ``{% generation %}``: what rendering messages[:i+1]
        adds to messages[:i] + generation prompt, i.e. exactly what the model generates at inference
        (the header given by the generation prompt is not trained)."""
        full, _ = self._render(messages, kwargs)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            head, _ = self._render(messages[:i], kwargs, add_generation_prompt=True)
            turn, _ = self._render(messages[: i + 1], kwargs)
            if not turn.startswith(head):
                raise ValueError(
                    f"chat template breaks the prefix property at message {i}: messages[:{i}] rendered with "
                    f"add_generation_prompt=True is not a prefix of messages[:{i + 1}] rendered, so assistant "
                    "spans cannot be derived; add {% generation %} markers to the template"
                )
            if not full.startswith(turn):
                raise ValueError(
                    f"chat template rewrites earlier turns: messages[:{i + 1}] rendered is not a prefix of the "
                    "whole conversation rendered (e.g. it drops past reasoning); add {% generation %} markers"
                )
            spans.append((len(head), len(turn)))
        self._check_eos(full, spans)
        return _Plan(full, tuple(spans), "prefix_diff")

    def _plan_prompt_completion(self, prompt: Any, completion: Any, kwargs: dict) -> _Plan:
        if isinstance(prompt, str) and isinstance(completion, str):
            text = prompt + self._with_eos(completion)
            start = 0 if self.loss == "all" else len(prompt)
            return _Plan(text, ((start, len(text)),), "all" if self.loss == "all" else "completion")
        if isinstance(prompt, str) or isinstance(completion, str):
            raise ValueError("prompt and completion must both be strings or both be message lists")
        full, _ = self._render(list(prompt) + list(completion), kwargs)
        if self.loss == "all":
            return _Plan(full, ((0, len(full)),), "all")
        head, _ = self._render(list(prompt), kwargs, add_generation_prompt=True)
        if not full.startswith(head):
            raise ValueError(
                "chat template breaks the prefix property: the prompt rendered with add_generation_prompt=True "
                "is not a prefix of prompt+completion rendered, so the completion cannot be located"
            )
        spans = ((len(head), len(full)),)
        self._check_eos(full, spans)
        return _Plan(full, spans, "completion")

    # ---------------------------------------------------------------- helpers
    def _render(
        self, messages: list[dict], kwargs: dict, *, add_generation_prompt: bool = False, track: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        # Same inputs as apply_chat_template: None-valued message keys dropped, special tokens
        # visible, `tools` passed as its own argument; plus our pinned strftime_now, which shadows
        # the environment global of the same name (jinja: context variables win over globals).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        kw = {**self._base_kwargs, **kwargs, "strftime_now": self._strftime_now}
        tools = kw.pop("tools", None)
        try:
            if track:
                text, spans = _render_with_assistant_indices(
                    self._compiled, messages, tools, None, add_generation_prompt, **kw
                )
                return text, spans
            return self._compiled.render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **kw
            ), []
        except jinja2.TemplateError as err:  # a bad row, e.g. a template's raise_exception()
            raise ValueError(f"chat template failed to render the row: {err}") from err

    def _with_eos(self, text: str) -> str:
        if self.eos_token and not text.endswith(self.eos_token):
            return text + self.eos_token
        return text

    def _check_eos(self, text: str, spans: Sequence[tuple[int, int]]) -> None:
        # The template writes the eos itself; a trained turn without it teaches the model never to stop.
        if not self.eos_token:
            return
        for start, end in spans:
            if not text[start:end].rstrip().endswith(self.eos_token):
                tail = text[max(start, end - 60) : end]
                raise ValueError(f"trained span does not end with eos_token {self.eos_token!r}: ...{tail!r}")

    def _label(self, plan: _Plan, encoding: Any) -> Rendered:
        ids = np.asarray(encoding.ids, dtype=np.int32)
        if plan.mask_method == "all" and plan.spans == ((0, len(plan.text)),):
            labels = ids.copy()
        else:
            # A token is trained when its character range overlaps a span (transformers' rule for
            # assistant masks). Offsets are sorted and contiguous, so each span maps to one slice
            # of tokens found by bisection; this avoids converting all offsets to an array.
            offsets = encoding.offsets
            labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
            for start, end in plan.spans:
                if end <= start:
                    continue
                lo = bisect.bisect_left(offsets, (start,))  # first token starting at/after `start`
                if lo > 0 and offsets[lo - 1][1] > start:  # ...or the one before, if it straddles `start`
                    lo -= 1
                hi = bisect.bisect_left(offsets, (end,))  # first token starting at/after `end`
                labels[lo:hi] = ids[lo:hi]
        if not np.any(labels != IGNORE_INDEX):
            raise ValueError(
                f"row has zero trained tokens (mask_method={plan.mask_method!r}, {len(ids)} tokens): "
                "no assistant turn / empty completion"
            )
        return Rendered(ids, labels, plan.mask_method)


def format_masked(
    tokenizer: Any,
    input_ids: Sequence[int] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    masked_open: str | None = None,
    masked_close: str | None = None,
    color: bool = True,
) -> str:
    """Decoded text with masked (label -100) spans marked, for ``raysft data preview``.

    ``color=True`` dims masked spans with ANSI codes (``\\x1b[2m`` ... ``\\x1b[0m``); ``color=False``
    wraps them in ``«`` ... ``»``. ``masked_open``/``masked_close`` override either choice.
    """
    default_open, default_close = ("\x1b[2m", "\x1b[0m") if color else ("«", "»")
    open_ = default_open if masked_open is None else masked_open
    close = default_close if masked_close is None else masked_close
    ids = np.asarray(input_ids).reshape(-1)
    masked = np.asarray(labels).reshape(-1) == IGNORE_INDEX
    if ids.shape != masked.shape:
        raise ValueError(f"input_ids and labels differ in length: {ids.shape[0]} vs {masked.shape[0]}")
    # Decode each run of equal masking separately. Run boundaries fall on template tokens in
    # practice, so splitting a multi-byte character across two runs is not a concern.
    cuts = np.flatnonzero(np.diff(masked.astype(np.int8))) + 1
    pieces = []
    for run in np.split(np.arange(ids.shape[0]), cuts):
        if run.size == 0:
            continue
        text = tokenizer.decode(ids[run].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces.append(f"{open_}{text}{close}" if masked[run[0]] else text)
    return "".join(pieces)

"""Schema of the `data` group: the mixture (alignment-handbook keys), the template, the loss mask and packing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


import logging

from raysft.config.checks import check_choice as _check_choice

log = logging.getLogger(__name__)

VALID_STRATEGIES: tuple[str, ...] = ("bfd", "bfd_split", "wrapped", "none")
# Old names -> current names. "ffd" comes from TRL <= 0.19 recipes (TRL now only
# has bfd); "bfd-requeue" is TRL's old spelling of bfd_split.
STRATEGY_ALIASES = {"ffd": "bfd", "bfd-requeue": "bfd_split"}
_warned_aliases: set[str] = set()  # warn once per process, not once per Ray batch


def normalize_strategy(name: str) -> str:
    """Map a user-facing strategy name to one of VALID_STRATEGIES.

    "ffd" -> "bfd" and "bfd-requeue" -> "bfd_split" with a warning (once per
    process: this is called for every window inside Ray workers).
    "bfd_split" is supported: over-long sequences are cut into max_length chunks
    (each chunk is its own sequence with positions from 0), then packed with bfd.
    """
    key = str(name).strip().lower()
    if key in STRATEGY_ALIASES:
        new = STRATEGY_ALIASES[key]
        if key not in _warned_aliases:
            _warned_aliases.add(key)
            log.warning("packing strategy %r is a deprecated alias; using %r instead", name, new)
        return new
    if key not in VALID_STRATEGIES:
        raise ValueError(
            f"Unknown packing strategy {name!r}; valid values are {VALID_STRATEGIES} "
            f"(aliases: {sorted(STRATEGY_ALIASES)})"
        )
    return key


@dataclass
class SourceConfig:
    """One entry of an alignment-handbook ``dataset_mixture.datasets`` list (same keys)."""

    id: Optional[str] = None
    """Hub dataset id, e.g. ``HuggingFaceTB/smoltalk2`` (read from ``data.root`` when that is set)."""
    path: Optional[str] = None
    """Local file, directory, hub-layout mirror or ``save_to_disk`` folder, instead of ``id``."""
    config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of ``id``; None = main."""
    columns: Optional[list[str]] = None
    weight: Optional[float] = 1.0
    """Fraction of the source's rows kept after a seeded shuffle (handbook semantics; null = 1.0).
    ``weight > 1`` repeats the source ``ceil(weight)`` times, then keeps that fraction."""
    name: Optional[str] = None
    """Label used in stats and per-source losses; defaults to the split name."""

    def validate(self) -> None:
        if (self.id is None) == (self.path is None):
            raise ValueError(f"data source {self.label!r}: set exactly one of `id` (hub dataset) or `path` (local)")
        if self.weight is None:  # handbook mixtures may leave the weight out: keep every row
            self.weight = 1.0
        if not self.weight > 0:
            raise ValueError(f"data source {self.label!r}: weight must be > 0, got {self.weight}")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.split != "train":
            return self.split
        return (self.id or self.path or "?").rstrip("/").rsplit("/", 1)[-1]


@dataclass
class MixtureConfig:
    datasets: list[SourceConfig] = field(default_factory=list)
    seed: int = 42
    test_split_size: float = 0.0
    """Rows held out for evaluation, as ``datasets``' ``train_test_split(test_size, seed)`` reads them:
    a fraction in [0, 1) of the mixed rows, or a whole number >= 1 of rows (the handbook's ``1000``)."""

    def validate(self) -> None:
        if not self.datasets:
            raise ValueError("data.dataset_mixture.datasets is empty: list at least one source")
        t = self.test_split_size
        if not (0.0 <= t < 1.0 or (t >= 1 and t == int(t))):
            raise ValueError(f"data.dataset_mixture.test_split_size must be in [0, 1) (a fraction) or a whole number "
                             f">= 1 (a row count, as datasets.train_test_split reads an int), got {t}")


@dataclass
class DataConfig:
    dataset_mixture: MixtureConfig = field(default_factory=MixtureConfig)
    root: Optional[str] = None
    """Local mirror of hub datasets in hub layout (``<config>/<split>-*.parquet``); ``bundled:`` paths
    resolve inside raysft's assets."""
    format: str = "auto"
    """``auto`` | ``messages`` | ``prompt_completion`` | ``text``."""
    column_map: str = "default"
    """``default`` (smoltalk2 / TRL names) or ``sharegpt`` (conversations / from / value)."""
    chat_template: Optional[str] = None
    """None = the tokenizer's template; ``mid`` / ``sft`` = the SmolLM3 recipe templates; a .jinja path; or
    the template text itself (inline, as TRL / alignment-handbook recipe files carry it)."""
    eos_token: Optional[str] = "<|im_end|>"
    loss: str = "assistant_only"
    """``assistant_only`` (TRL assistant_only_loss), ``completion_only`` (prompt-completion) or ``all``."""
    max_length: int = 1024
    """Tokens per packed row (TRL ``max_length``)."""
    packing: bool = True
    packing_strategy: str = "bfd"
    """``bfd`` (best-fit decreasing; ``ffd`` accepted as its old name), ``wrapped`` or ``none``."""
    overlong: str = "truncate"
    """What happens to a sequence longer than ``max_length``: ``truncate`` or ``drop`` (counted either way)."""
    window_rows: int = 4096
    """Rows packed together in one bounded BFD window (memory stays flat whatever the dataset size)."""
    order: str = "handbook"
    """``handbook``: the exact row order of the handbook's global shuffle (random reads; for data
    that is cheap to read randomly). ``streaming``: the same rows, read file chunk by file chunk,
    chunks interleaved by a seeded shuffle (sequential reads; for 100 GB mixtures)."""
    max_bad_fraction: float = 0.01
    """Abort when more than this fraction of a source's selected rows is malformed."""
    dedupe: bool = True
    """Skip a row that repeats an earlier one of its source (same ``id``, or the same content),
    reported as a duplicate (not as malformed). The alignment-handbook does not deduplicate:
    ``false`` keeps every row, reproducing its rows exactly."""
    special_tokens_in_text: str = "skip"
    """A row whose text holds one of the tokenizer's special tokens (e.g. ``<|im_end|>`` inside a user
    message, which the tokenizer turns into a fake turn boundary and so a wrong loss mask): ``skip``
    it or ``keep`` it; counted and reported under its own reason either way."""
    date: Optional[str] = None
    """Date the chat template prints (``strftime_now``), ISO format. None = the run's start date, recorded."""

    def validate(self) -> None:
        _check_choice("data.format", self.format, ("auto", "messages", "prompt_completion", "text"))
        _check_choice("data.column_map", self.column_map, ("default", "sharegpt"))
        _check_choice("data.loss", self.loss, ("assistant_only", "completion_only", "all"))
        _check_choice("data.packing_strategy", self.packing_strategy, ("bfd", "ffd", "bfd_split", "wrapped", "none"))
        _check_choice("data.overlong", self.overlong, ("truncate", "drop"))
        _check_choice("data.order", self.order, ("handbook", "streaming"))
        _check_choice("data.special_tokens_in_text", self.special_tokens_in_text, ("skip", "keep"))
        if self.max_length <= 0:
            raise ValueError(f"data.max_length must be > 0, got {self.max_length}")
        if self.window_rows <= 0:
            raise ValueError(f"data.window_rows must be > 0, got {self.window_rows}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")

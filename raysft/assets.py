"""Locations of the files shipped inside raysft (tokenizer, recipe templates, sample data).

A config value ``bundled:<relative path>`` points inside ``raysft/assets/``, so the default run and
the tests never need a hub or ``../shared``.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_PREFIX = "bundled:"
_ALIASES = {"smollm3": "tokenizer/smollm3"}
TEMPLATES = {"sft": ASSETS / "templates" / "sft_chat_template.jinja", "mid": ASSETS / "templates" / "mid_chat_template.jinja"}


def resolve(path: str | None) -> str | None:
    """``bundled:smollm3`` -> absolute path of the bundled copy; any other value is returned as is."""
    if path is None or not path.startswith(BUNDLED_PREFIX):
        return path
    rel = path[len(BUNDLED_PREFIX):]
    full = ASSETS / _ALIASES.get(rel, rel)
    if not full.exists():
        raise FileNotFoundError(f"{path!r}: no bundled asset at {full}")
    return str(full)


def is_inline_template(spec: str) -> bool:
    """Template text rather than a name or a path: it holds Jinja markup, which no path does."""
    return "{{" in spec or "{%" in spec


def load_chat_template(spec: str | None) -> str | None:
    """None -> None (use the tokenizer's); ``sft`` / ``mid`` -> the recipe templates; template text
    (inline, as TRL recipe files carry it) -> itself; else a file path."""
    if spec is None:
        return None
    if is_inline_template(spec):
        return spec
    path = TEMPLATES.get(spec) or Path(resolve(spec))
    if not path.exists():
        raise FileNotFoundError(f"data.chat_template={spec!r}: no such file; use 'sft', 'mid', a .jinja path, the template text, or null for the tokenizer's template")
    return path.read_text()

"""The one validation helper every schema module shares."""

from __future__ import annotations

from typing import Any


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}")

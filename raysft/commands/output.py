"""Where the offline commands (`raysft data stats`, `raysft plan`) leave their results."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

MIXTURE_PLOT = "mixture.png"


def write_command_output(out: str | None, kind: str, filename: str, data: dict[str, Any],
                         plot: Callable[[dict[str, Any]], bytes]) -> Path:
    """``filename`` (JSON) and mixture.png in ``out`` (default outputs/<kind>/<timestamp>), each
    announced on stdout."""
    out_dir = Path(out or os.path.join("outputs", kind, time.strftime("%Y%m%d-%H%M%S")))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / filename).write_text(json.dumps(data, indent=1))
    (out_dir / MIXTURE_PLOT).write_bytes(plot(data))
    print(f"wrote {out_dir / filename}\nwrote {out_dir / MIXTURE_PLOT}")
    return out_dir

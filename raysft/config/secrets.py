"""What never leaves the process in a saved config: secret-valued keys are redacted."""

from __future__ import annotations

import re
from typing import Any

# Keys whose string values are secrets (hub_token, wandb api_key, aws_secret_access_key, ...);
# "max_new_tokens" or "average_tokens_across_devices" are not.
# Tokenizer special tokens (data.eos_token, pad_token, ...) are not secrets either.
SECRET_KEY = re.compile(r"(?<!eos_)(?<!bos_)(?<!pad_)(?<!unk_)(?<!sep_)(?<!cls_)(?<!mask_)"
                        r"(token|secret|password|passwd|api_key|access_key|credentials?)$", re.IGNORECASE)
REDACTED = "<redacted>"


def redact(obj: Any) -> Any:
    """Drop any secret-looking value before a config is written anywhere."""
    if isinstance(obj, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and isinstance(v, str) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj

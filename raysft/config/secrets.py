"""Secrets never leave the process in anything raysft writes or hands to Ray.

- Saved configs: secret-valued keys are redacted (``redact``).
- The hub token given as ``trainer.trl_overrides.hub_token`` travels as ``HF_TOKEN`` in the
  environment (``hub_token_to_env``), never in the Trainer's arguments (pickled into every
  checkpoint's ``training_args.bin``) nor in Ray's train_loop_config (kept in Ray Train's run state).
- Environment variables that hold credentials (``SECRET_ENV``) are never put in a Ray runtime_env,
  which Ray writes verbatim to ``runtime_env_agent.log`` on every node.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

# Keys whose string values are secrets (hub_token, wandb api_key, aws_secret_access_key, ...);
# "max_new_tokens" or "average_tokens_across_devices" are not.
# Tokenizer special tokens (data.eos_token, pad_token, ...) are not secrets either.
SECRET_KEY = re.compile(r"(?<!eos_)(?<!bos_)(?<!pad_)(?<!unk_)(?<!sep_)(?<!cls_)(?<!mask_)"
                        r"(token|secret|password|passwd|api_key|access_key|credentials?)$", re.IGNORECASE)
REDACTED = "<redacted>"

# Environment variables holding credentials: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN, HF_TOKEN, WANDB_API_KEY, GOOGLE_APPLICATION_CREDENTIALS, ... Endpoints,
# regions, project names and offline flags are not.
SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(_|$)")

# Where the hub client (huggingface_hub, and the Trainer's push_to_hub) reads the token.
HUB_TOKEN_ENV = "HF_TOKEN"


def redact(obj: Any) -> Any:
    """Drop any secret-looking value before a config is written anywhere."""
    if isinstance(obj, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and isinstance(v, str) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def without_secrets(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` less its secret-named keys (what may go into the Trainer's arguments)."""
    return {k: v for k, v in overrides.items() if not SECRET_KEY.search(str(k))}


def hub_token_to_env(trl_overrides: Mapping[str, Any]) -> bool:
    """Move ``trainer.trl_overrides.hub_token`` into ``HF_TOKEN`` of this process (the override wins
    over a token already there). Workers of a local Ray started afterwards inherit it. True if moved."""
    token = trl_overrides.get("hub_token")
    if not isinstance(token, str) or not token or token == REDACTED:
        return False
    os.environ[HUB_TOKEN_ENV] = token
    return True

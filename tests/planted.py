"""One real run that meets two things a real run meets, shared by two tests (each run costs ~50 s
on 2 cores): secrets planted in its environment and on its command line (test_secrets searches
every byte it left behind), and storage that goes down at its final save (test_storage_faults
checks the model is kept on the node and the command it names uploads it).

The run is what a user starts: ``python -m raysft`` in a subprocess with its own local Ray, S3 on
the session's moto server through the cuttable proxy (conftest ``s3``), in a bucket of its own."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

STEPS = 2
BUCKET = "planted"
STORAGE = f"s3://{BUCKET}/runs"
NAME = "planted"


@dataclass
class PlantedRun:
    work: Path  # short (Ray's socket paths live under it); everything the run wrote locally is under it
    cwd: Path  # the run's working directory (Hydra's outputs/)
    tmp: Path  # RAY_TMPDIR and TMPDIR: the Ray session and the workers' scratch folders
    unsaved: Path  # RAYSFT_UNSAVED_DIR: what the run kept on the node while storage was down
    exported: Path  # `raysft export` of the run, after the kept model was uploaded
    planted: dict[str, str]  # name -> secret value
    env: dict[str, str]  # the run's environment (with the secrets)
    code: int  # the run's exit code
    out: str  # the run's stdout and stderr, as the user's terminal showed them
    cut_after_step: bool  # storage went down once the last step's line was printed
    upload: subprocess.CompletedProcess  # `raysft upload <kept model> <the run's model/>`
    export: subprocess.CompletedProcess


def start(s3, work: Path) -> PlantedRun:
    cwd, tmp, unsaved, exported = work / "cwd", work / "t", work / "unsaved", work / "exported"
    for d in (cwd, tmp):
        d.mkdir(parents=True)
    planted = {name: f"{name.lower().replace('_', '')}{secrets.token_hex(12)}"
               for name in ("WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "hub_token")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_", "WANDB_", "HF_TOKEN"))}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    env.update({"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": planted["AWS_SECRET_ACCESS_KEY"], "AWS_DEFAULT_REGION": "us-east-1",
                "WANDB_API_KEY": planted["WANDB_API_KEY"], "HF_TOKEN": planted["HF_TOKEN"],
                "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAYSFT_UNSAVED_DIR": str(unsaved),
                # Ray's export events (jobs, actors, tasks, Train runs with their configs) are
                # written to the session's logs too, so they are searched as well.
                "RAY_enable_export_api_write": "1", "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
                # The run's Ray session (<RAY_TMPDIR>/ray/session_*) and the workers' scratch
                # folders (tempfile) land where the test searches.
                "RAY_TMPDIR": str(tmp), "TMPDIR": str(tmp),
                "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])})
    s3.client.create_bucket(Bucket=BUCKET)
    s3.proxy.up()
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysft", f"storage.path={STORAGE}", f"storage.name={NAME}", f"trainer.max_steps={STEPS}",
         "trainer.save_strategy=steps", "trainer.save_steps=1", "trainer.eval_steps=null", "monitor.sample_prompts=[]",
         "storage.retry_timeout_s=3", f"+trainer.trl_overrides.hub_token={planted['hub_token']}"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    cut: list[bool] = []

    def watch() -> None:
        for line in proc.stdout:
            lines.append(line)
            if not cut and f"step {STEPS}/{STEPS} | loss" in line:
                s3.proxy.down()  # the last step is done: its checkpoint and the final save meet a dead storage
                cut.append(True)

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    started = time.perf_counter()
    try:
        code = proc.wait(timeout=600)
    finally:
        s3.proxy.up()
    reader.join(10)
    print(f"planted run: {time.perf_counter() - started:.0f} s, exit {code}")
    kept = unsaved / NAME / "model"
    upload = subprocess.run([sys.executable, "-m", "raysft", "upload", str(kept), f"{STORAGE}/{NAME}/model"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    export = subprocess.run([sys.executable, "-m", "raysft", "export", f"{STORAGE}/{NAME}", str(exported)],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return PlantedRun(work, cwd, tmp, unsaved, exported, planted, env, code, "".join(lines), bool(cut), upload, export)


def keys(s3, prefix: str = "") -> list[dict]:
    """The objects in the run's bucket (read from moto directly, not through the proxy)."""
    return [o for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]

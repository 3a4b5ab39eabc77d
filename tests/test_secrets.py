"""Planted secrets: a real local run (tests/planted.py: a subprocess, its own Ray session, S3 on
moto's server) with secret values in the environment and on the command line, then every byte it
left behind is searched for them: the run directory and its checkpoints in the bucket, what it kept
on the node while storage was down, the working directory (Hydra's outputs/), the workers' scratch
folders, the Ray session's logs, an exported model."""

from __future__ import annotations

import base64
import gzip
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import planted

from raysft.config.secrets import SECRET_KEY, redact

ROOT = Path(__file__).resolve().parent.parent


def test_redact_keeps_secret_values_out_of_saved_configs():
    cfg = {"trainer": {"trl_overrides": {"hub_token": "hf_x", "hub_model_id": "me/m"}}, "data": {"eos_token": "<|im_end|>"}}
    assert redact(cfg) == {"trainer": {"trl_overrides": {"hub_token": "<redacted>", "hub_model_id": "me/m"}},
                           "data": {"eos_token": "<|im_end|>"}}
    assert SECRET_KEY.search("wandb_api_key") and not SECRET_KEY.search("max_new_tokens")


def test_sft_args_hold_no_secret_and_the_hub_token_moves_to_the_environment(compose_cfg, monkeypatch):
    from raysft.config import from_plain, to_plain
    from raysft.config.secrets import hub_token_to_env
    from raysft.train import worker

    # The SFTConfig's own __post_init__ wants a process group here; what it is given is the point.
    monkeypatch.setattr(worker, "SFTConfig", lambda **kwargs: kwargs)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    cfg = compose_cfg("+trainer.trl_overrides.hub_token=hf_planted123", "+trainer.trl_overrides.hub_model_id=me/m")
    # What a worker gets (the driver redacts the train_loop_config) and what it would get unredacted.
    for seen in (from_plain(redact(to_plain(cfg))), cfg):
        args = worker.build_sft_args(seen, output_dir="/tmp/x", max_steps=2, has_eval=False, bf16=False)
        assert "hub_token" not in args and args["hub_model_id"] == "me/m"
    assert hub_token_to_env(cfg.trainer.trl_overrides) and os.environ["HF_TOKEN"] == "hf_planted123"


def test_credentials_are_never_forwarded_through_the_runtime_env(monkeypatch):
    from raysft.storage import files

    planted = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_SESSION_TOKEN": "c", "HF_TOKEN": "d",
               "WANDB_API_KEY": "e", "GOOGLE_APPLICATION_CREDENTIALS": "f"}
    kept = {"AWS_ENDPOINT_URL": "http://x", "AWS_DEFAULT_REGION": "r", "WANDB_PROJECT": "p", "HF_HUB_OFFLINE": "1"}
    for k, v in {**planted, **kept}.items():
        monkeypatch.setenv(k, v)
    env = files.forwarded_env()
    assert not set(planted) & set(env) and kept.items() <= env.items()


def test_submit_sends_no_credential_with_the_job_unless_named(tmp_path):
    """launch/submit.sh against a fake ``ray`` that records the runtime env it is given."""
    import json
    import textwrap

    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import shutil, sys
        args = sys.argv[1:]
        shutil.copy(args[args.index("--runtime-env") + 1], {str(tmp_path / "renv.json")!r})
        """))
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "WANDB_API_KEY": "wandbplanted", "HF_TOKEN": "hfplanted", "AWS_SECRET_ACCESS_KEY": "awsplanted",
           "WANDB_PROJECT": "proj", "AWS_ENDPOINT_URL": "http://s3.local"}

    def submit(**extra):
        p = subprocess.run([str(ROOT / "launch" / "submit.sh"), "--address", "http://10.0.0.1:8265", "--no-wait", "--",
                            "trainer.max_steps=1"], env={**env, **extra}, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return json.loads((tmp_path / "renv.json").read_text())["env_vars"], p.stderr

    sent, _ = submit()
    assert sent["WANDB_PROJECT"] == "proj" and sent["AWS_ENDPOINT_URL"] == "http://s3.local"
    assert not {"WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY"} & set(sent)
    sent, err = submit(RAYSFT_FORWARD_ENV="HF_TOKEN")  # asked for: sent, with a warning, value never printed
    assert sent["HF_TOKEN"] == "hfplanted" and "warning: HF_TOKEN" in err and "hfplanted" not in err


# ----------------------------------------------------------------------------- the planted run


def _forms(value: str) -> list[bytes]:
    """The byte patterns a leaked value could take: raw (also what repr, JSON, YAML and pickle
    protocol >= 1 hold for a plain ASCII token), UTF-16, hex and base64 at every alignment."""
    raw = value.encode()
    out = [raw, value.encode("utf-16-le"), raw.hex().encode()]
    for k in range(3):  # base64 inside a longer string: the value's bytes start at one of 3 offsets of a group
        out.append(base64.b64encode(raw[k:])[: len(raw[k:]) // 3 * 4])
    return out


def _blobs(path: Path, data: bytes):
    """A file's bytes, plus the members of zip archives (torch.save) and gzip files, decompressed."""
    yield path, data
    if data[:2] == b"\x1f\x8b":
        try:
            yield path, gzip.decompress(data)
        except OSError:
            pass
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                for name in z.namelist():
                    yield path / name, z.read(name)
        except (zipfile.BadZipFile, OSError):
            pass


def _hits(roots: dict[str, Path], planted: dict[str, str]) -> list[str]:
    found, scanned = [], 0
    for where, root in roots.items():
        for p in sorted(root.rglob("*")):
            if not p.is_file() or p.is_symlink():
                continue
            try:
                data = p.read_bytes()
            except OSError:  # a socket or a file removed meanwhile
                continue
            scanned += 1
            for name, blob in _blobs(p, data):
                for what, value in planted.items():
                    if any(f in blob for f in _forms(value)):
                        found.append(f"{what} in {where}: {name.relative_to(root) if name != root else name}")
    assert scanned > 50, f"only {scanned} files scanned: the run left less than expected"
    return sorted(set(found))


@pytest.mark.ray
@pytest.mark.slow
def test_no_planted_secret_is_written_anywhere(planted_run, s3):
    """The planted run (tests/planted.py: secrets in the environment and a hub token on the command
    line; storage down at its final save, the kept model uploaded and the run exported afterwards)."""
    run = planted_run
    assert run.code == 4 and run.upload.returncode == 0, run.out[-3000:] + run.upload.stderr[-2000:]
    assert run.export.returncode == 0, run.export.stdout[-3000:] + run.export.stderr[-3000:]
    bucket_dir = run.work / "bucket"
    objects = planted.keys(s3)
    keys = [o["Key"] for o in objects]
    # Empty objects (pyarrow's directory markers, whose keys are also prefixes) hold nothing.
    for key in (o["Key"] for o in objects if o["Size"]):
        dest = bucket_dir / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        s3.client.download_file(planted.BUCKET, key, str(dest))

    assert f"runs/{planted.NAME}/model/model.safetensors" in keys
    # Checkpoints are searched: the one uploaded before the cut, and those kept on the node after it.
    stored = [k for k in keys if "/checkpoint_" in k and k.endswith("training_args.bin")]
    kept = list(run.unsaved.rglob("checkpoint_*/training_args.bin"))
    assert stored or kept, (keys, sorted(run.unsaved.rglob("*")))
    tmp = run.tmp
    logs = next(tmp.glob("ray/session_*/logs"))  # the Ray session is searched, its export events too
    assert (logs / "runtime_env_agent.log").exists()
    exported_events = {p.stem.removeprefix("event_") for p in logs.glob("export_events/*.log")}
    assert {"EXPORT_TRAIN_STATE", "EXPORT_ACTOR", "EXPORT_DRIVER_JOB"} <= exported_events
    # Ray Train's run state holds the train_loop_config (the config, redacted; Ray 2.60 cuts it at
    # depth 3 too) and the run_config with the workers' runtime_env.
    assert b'"train_loop_config"' in (logs / "export_events" / "event_EXPORT_TRAIN_STATE.log").read_bytes()
    (run.cwd / "stdout.txt").write_text(run.out + run.upload.stdout + run.upload.stderr + run.export.stdout +
                                        run.export.stderr)  # what the user's terminal showed
    hits = _hits({"bucket": bucket_dir, "cwd": run.cwd, "tmp (Ray session, worker scratch)": tmp,
                  "unsaved (kept on the node)": run.unsaved, "exported": run.exported}, run.planted)
    # The one copy Ray keeps of a secret typed on the command line: the driver's command line
    # (what `ps` shows), which Ray records as the job's entrypoint (README "Secrets").
    token = run.planted["hub_token"]
    entrypoint = [h for h in hits if h.startswith("hub_token in tmp") and h.endswith("/event_EXPORT_DRIVER_JOB.log")]
    assert len(entrypoint) == 1 and f"+trainer.trl_overrides.hub_token={token}".encode() in \
        next(tmp.glob("ray/session_*/logs/export_events/event_EXPORT_DRIVER_JOB.log")).read_bytes()
    assert [h for h in hits if h not in entrypoint] == [], "\n".join(hits)

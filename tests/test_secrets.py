"""Planted secrets: a real local run (a subprocess, its own Ray session, S3 on moto's server) with
secret values in the environment and on the command line, then every byte it left behind is
searched for them: the run directory and its checkpoints in the bucket, the working directory
(Hydra's outputs/), the workers' scratch folders, the Ray session's logs, an exported model."""

from __future__ import annotations

import base64
import gzip
import io
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
from conftest import free_port

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
def test_no_planted_secret_is_written_anywhere():
    import boto3

    work = Path(tempfile.mkdtemp(prefix="rsec-", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        cwd, tmp, bucket_dir, exported = work / "cwd", work / "t", work / "bucket", work / "exported"
        for d in (cwd, tmp, bucket_dir):
            d.mkdir()
        planted = {name: f"{name.lower().replace('_', '')}{secrets.token_hex(12)}"
                   for name in ("WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "hub_token")}
        port = free_port()
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_", "WANDB_", "HF_TOKEN"))}
            env.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": planted["AWS_SECRET_ACCESS_KEY"], "AWS_DEFAULT_REGION": "us-east-1",
                        "WANDB_API_KEY": planted["WANDB_API_KEY"], "HF_TOKEN": planted["HF_TOKEN"],
                        "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                        # Ray's export events (jobs, actors, tasks, Train runs with their configs) are
                        # written to the session's logs too, so they are searched as well.
                        "RAY_enable_export_api_write": "1", "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
                        # The run's Ray session (<RAY_TMPDIR>/ray/session_*) and the workers' scratch
                        # folders (tempfile) land where the test searches.
                        "RAY_TMPDIR": str(tmp), "TMPDIR": str(tmp),
                        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])})
            client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                                  aws_secret_access_key="test", region_name="us-east-1")
            for _ in range(100):
                try:
                    client.create_bucket(Bucket="sec")
                    break
                except Exception:
                    time.sleep(0.2)
            started = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "-m", "raysft", "storage.path=s3://sec/runs", "storage.name=planted",
                 "trainer.max_steps=2", "trainer.save_strategy=steps", "trainer.save_steps=1", "trainer.eval_steps=null",
                 "monitor.sample_prompts=[]", f"+trainer.trl_overrides.hub_token={planted['hub_token']}"],
                cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
            print(f"run: {time.perf_counter() - started:.0f} s")
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            export = subprocess.run([sys.executable, "-m", "raysft", "export", "s3://sec/runs/planted", str(exported)],
                                    cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
            assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]

            objects = [o for page in client.get_paginator("list_objects_v2").paginate(Bucket="sec")
                       for o in page.get("Contents", [])]
            keys = [o["Key"] for o in objects]
            # Empty objects (pyarrow's directory markers, whose keys are also prefixes) hold nothing.
            for key in (o["Key"] for o in objects if o["Size"]):
                dest = bucket_dir / key
                dest.parent.mkdir(parents=True, exist_ok=True)
                client.download_file("sec", key, str(dest))
        finally:
            moto.terminate()
            moto.wait(timeout=10)

        assert "runs/planted/model/model.safetensors" in keys
        assert any("/checkpoint_" in k and k.endswith("training_args.bin") for k in keys)  # checkpoints are searched
        logs = next(tmp.glob("ray/session_*/logs"))  # the Ray session is searched, its export events too
        assert (logs / "runtime_env_agent.log").exists()
        exported_events = {p.stem.removeprefix("event_") for p in logs.glob("export_events/*.log")}
        assert {"EXPORT_TRAIN_STATE", "EXPORT_ACTOR", "EXPORT_DRIVER_JOB"} <= exported_events
        # Ray Train's run state holds the train_loop_config (the config, redacted; Ray 2.60 cuts it at
        # depth 3 too) and the run_config with the workers' runtime_env.
        assert b'"train_loop_config"' in (logs / "export_events" / "event_EXPORT_TRAIN_STATE.log").read_bytes()
        (cwd / "stdout.txt").write_text(run.stdout + run.stderr)  # what the user's terminal showed
        hits = _hits({"bucket": bucket_dir, "cwd": cwd, "tmp (Ray session, worker scratch)": tmp, "exported": exported},
                     planted)
        # The one copy Ray keeps of a secret typed on the command line: the driver's command line
        # (what `ps` shows), which Ray records as the job's entrypoint (README "Secrets").
        entrypoint = [h for h in hits if h.startswith("hub_token in tmp") and h.endswith("/event_EXPORT_DRIVER_JOB.log")]
        assert len(entrypoint) == 1 and f"+trainer.trl_overrides.hub_token={planted['hub_token']}".encode() in \
            next(tmp.glob("ray/session_*/logs/export_events/event_EXPORT_DRIVER_JOB.log")).read_bytes()
        assert [h for h in hits if h not in entrypoint] == [], "\n".join(hits)
    finally:
        shutil.rmtree(work, ignore_errors=True)

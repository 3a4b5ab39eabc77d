"""What a person sees: the README's default command, as a user runs it (a subprocess, its own local
Ray), prints one line per step and no library chatter, with the full logs in the run folder; a run
that fails at step N ends in one line that says what and where, with the traceback in the logs."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
from conftest import ROOT

from raysft.train.loop import PROGRESS_MARK

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 12
BUDGET_LINES = 40  # the whole console of a 12-step default run
# Chatter the default job used to print (issue #18): none of it may reach the console.
CHATTER = ["Execution plan of Dataset", "core_worker.cc", "Setting accelerator to CPU", "FutureWarning",
           "exclude_resources", "gemm_4bit", "clean_up_tokenization_spaces", "{'loss':", "it/s]",
           "Started a local Ray instance", "Requesting resources", "Started training worker group",
           "Setting up process group", "Progress bars disabled", "Token authentication", "logging.cc",
           "Found multiple active Ray instances", "PlacementGroupCleaner"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}


def _raysft(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raysft", *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=900)


def _raysft_at_a_terminal(args: list[str], cwd: Path) -> tuple[int, str, str, str]:
    """Run with stdout on a pseudo-terminal (120 columns), as a person at a console does; stderr
    stays a pipe. Returns (exit code, the raw terminal bytes as text, what the terminal shows
    once every carriage return has redrawn its line, stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "raysft", *args], cwd=cwd, env=_env(), stdout=slave,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(slave)
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    reader.start()
    raw = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        raw += chunk
    p.wait(timeout=900)
    reader.join(timeout=60)
    os.close(master)
    text = raw.decode(errors="replace")
    shown = "\n".join(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line).split("\r")[-1] for line in text.replace("\r\n", "\n").split("\n"))
    return p.returncode, text, shown, b"".join(err).decode(errors="replace")


def test_the_default_job_prints_one_line_per_step_and_keeps_everything_in_its_logs(tmp_path):
    """At a terminal: one line per logging step, a live progress bar, no chatter; the logs folder
    holds the lines (not the bar)."""
    # The README's first example, shortened with a documented override.
    first = _readme_examples()[0].split("#", 1)[0].split()[1:]
    assert first == ["trainer.learning_rate=1e-3", "trainer.warmup_ratio=0.1"]
    code, raw, shown, stderr = _raysft_at_a_terminal(
        [*first, f"storage.path={tmp_path / 'runs'}", "storage.name=console", f"trainer.max_steps={STEPS}"], tmp_path)
    out = shown + "\n" + stderr
    assert code == 0, out[-4000:]
    # The bar was drawn (tqdm redraws it in place) and is gone at the end; rank 0's marks never show.
    assert re.search(rf"train {STEPS // 2}/{STEPS} ", raw) and f"train {STEPS}/{STEPS}" not in shown, raw[-3000:]
    assert PROGRESS_MARK not in raw + stderr
    lines = [x for x in out.splitlines() if x.strip()]
    for step in range(1, STEPS + 1):
        hits = [x for x in lines if re.search(rf"\bstep {step}/{STEPS} \| loss ", x)]
        assert len(hits) == 1, (step, hits)
    for word in CHATTER:
        assert not [x for x in lines if word in x], word
    assert len(lines) <= BUDGET_LINES, "\n".join(lines)
    assert re.search(r"train loss \d+\.\d{3} -> \d+\.\d{3}", out)  # rounded, not 11.75894832611084
    # The driver's last line (stdout: workers' lines arrive on stderr, interleaved by the terminal).
    assert shown.strip().splitlines()[-1].startswith("raysft: done. Run directory:")

    logs = tmp_path / "runs" / "console" / "logs"
    driver, workers = (logs / "driver.log").read_text(), [(logs / f"worker-rank{r}.log").read_text() for r in (0, 1)]
    # The driver's whole console (and the records of every library logger) is in its log.
    assert "raysft: done." in driver and len(driver.splitlines()) >= len(shown.strip().splitlines())
    assert f"train {STEPS // 2}/{STEPS}" not in driver and PROGRESS_MARK not in driver  # lines, not the bar
    assert f"step {STEPS}/{STEPS}" in workers[0]
    assert all((logs / f"worker-rank{r}.log").exists() for r in (0, 1))  # each worker's own log file


def test_a_worker_failing_at_step_n_ends_in_one_line_with_the_traceback_in_the_logs(tmp_path):
    # A real failure through config: HF's best-checkpoint bookkeeping asks for a metric the
    # evaluation does not produce, at the first checkpoint (step 1).
    p = _raysft([f"storage.path={tmp_path / 'runs'}", "storage.name=broken", "trainer.max_steps=3",
                 "trainer.eval_steps=1", "trainer.save_strategy=steps", "trainer.save_steps=1",
                 "+trainer.trl_overrides.metric_for_best_model=eval_not_a_metric"], tmp_path)
    assert p.returncode == 1, (p.stdout + p.stderr)[-4000:]
    last = p.stderr.strip().splitlines()[-1]
    assert re.match(r"raysft: error: worker rank \d, step 1 failed: KeyError: .*eval_not_a_metric", last), last
    log = tmp_path / "runs" / "broken" / "logs" / "driver-error.txt"
    assert str(log) in last and "Traceback (most recent call last)" in log.read_text()
    assert "Error executing job" not in p.stderr and "Traceback" not in p.stderr  # no raw Hydra/Ray wrappers
    assert PROGRESS_MARK not in p.stdout + p.stderr and "train 1/3" not in p.stdout  # no terminal: no bar


def _readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text[text.index("Examples:\n\n```bash\n") + len("Examples:\n\n```bash\n"):]
    return [line for line in block[:block.index("```")].splitlines() if line.startswith("raysft ")]


def test_every_readme_example_runs_here_or_says_what_it_needs(tmp_path):
    """Each example either runs on this machine (run here, shortened with trainer.max_steps) or says
    plainly what it needs; the first is the console test's run above."""
    examples = _readme_examples()
    runnable = [e for e in examples if "(runs here" in e or "runs here" in e.split("#", 1)[-1]]
    needs = [e for e in examples if e not in runnable and "--cfg" not in e]
    assert all("# needs" in e for e in needs), needs
    shrunk = [e for e in runnable if "recipe=" in e]
    assert shrunk, examples
    for example in shrunk:
        args = example.split("#", 1)[0].split()[1:]
        p = _raysft([*args, f"storage.path={tmp_path / 'runs'}", "trainer.max_steps=1"], tmp_path)
        assert p.returncode == 0, (example, (p.stdout + p.stderr)[-3000:])
    cfg = _raysft(["--cfg", "job"], tmp_path)
    assert cfg.returncode == 0 and "name_or_path: bundled:smollm3" in cfg.stdout

"""raysft.train.metrics on its own (no Ray): what a worker writes for each log call."""

from __future__ import annotations

import json
from types import SimpleNamespace

from raysft.train.metrics import MetricsCallback


def test_a_run_resumed_at_its_last_step_logs_its_final_evaluation(tmp_path):
    """A group restarted after the last checkpoint (e.g. an elastic resize) trains nothing: the
    Trainer never begins training, and the final evaluation's log call still writes its record."""
    path = tmp_path / "metrics.jsonl"
    cb = MetricsCallback(str(path), world_size=2, report_to_ray=False)
    state = SimpleNamespace(global_step=6, epoch=1.0, max_steps=6, is_world_process_zero=True)
    cb.on_log(None, state, None, logs={"eval_loss": 1.25})
    (record,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert record["global_step"] == 6 and record["eval_loss"] == 1.25 and record["time_s"] >= 0

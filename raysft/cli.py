"""``raysft`` command line: a Hydra app over the shipped ``conf/`` tree plus a few offline subcommands.

    raysft [overrides...]                 train (the default job with no overrides)
    raysft sweep=<preset> [overrides...]  a Ray Tune sweep of full runs
    raysft data preview|stats [overrides] look at the data a run would see
    raysft export SRC DEST [--merge]      a consolidated Hugging Face model from a run
    raysft upload SRC DEST                upload a folder a run kept on a node when storage was down
    raysft plan [--out DIR] [overrides]   rows, tokens, steps, memory, time and cost, without training

  Outputs: <storage.path>/<run name>/ (default runs/): config.yaml (with derived values), metrics.jsonl,
  model/, checkpoint_*/, logs/ (driver and worker logs); tokenised data once per fingerprint under
  <storage.path>/prepared/. `raysft plan` and `raysft data stats` write to outputs/<command>/<time>/.
  Failures end in one line `raysft: error: ...`; exit codes 1 worker, 2 config, 3 data, 4 storage,
  5 data stall, 6 out of memory, 7 no intact checkpoint, 8 loss-spike guard, 9 another driver writes
  the run; Ctrl-C / SIGTERM: a checkpoint, then `raysft: stopped at step N ...`, exit 130 / 143.

  Coming from the alignment-handbook or `trl sft --config` (any command above takes the flags):
    raysft --trl-config RECIPE.yaml [--accelerate-config ZERO3.yaml] [overrides...]
    raysft import-recipe RECIPE.yaml [--accelerate-config ZERO3.yaml] > conf/recipe/mine.yaml
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from raysft import logs
from raysft.config import OverrideKeyError, check_override_keys, register_configs, to_typed
from raysft.config.compose import CONF_SEARCH_PATH, overrides_in

SUBCOMMANDS = ("data", "export", "plan", "upload", "import-recipe")


def recipe_flags(argv: list[str]) -> bool:
    return any(a.split("=", 1)[0] in ("--trl-config", "--accelerate-config") for a in argv)


@hydra.main(config_path=CONF_SEARCH_PATH, config_name="config", version_base=None)
def _train(cfg: DictConfig) -> None:
    # NOTE: the orchestration layers (Ray, torch, TRL) are imported only once a run starts, so that
    # `raysft --help`, `--cfg job` and config errors answer in a second.
    from raysft.commands import fits
    from raysft.run import failures
    from raysft.run.driver import run
    from raysft.sweep import trials

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    typed = to_typed(cfg)
    logs.filter_console_handlers(logging.getLogger(), typed.monitor.verbose)  # libraries' chatter: log file only
    if typed.sweep is not None:  # `raysft sweep=lr ...`: a Ray Tune sweep of full runs
        hc = HydraConfig.get()
        config_dir = next((s.path for s in hc.runtime.config_sources if s.provider == "command-line"), None)
        try:
            trials.run(list(hc.overrides.task), config_dir=config_dir, config_name=hc.job.config_name or "config")
        except trials.SweepConfigError as e:
            print(f"raysft: error: {e}", file=sys.stderr)
            sys.exit(2)
        return
    try:
        if typed.preflight:
            fits.check_memory(typed)  # the plan's memory model, before Ray starts
        run(typed)
    except failures.RunStopped as e:  # a signal: stopped as asked, with a checkpoint unless sent twice
        failures.stop_ray()
        print(f"raysft: {e.line}", file=sys.stderr, flush=True)
        sys.exit(e.code)
    except Exception as e:  # noqa: BLE001 - every failure ends in one line and an exit code (run/failures.py)
        code, line = failures.one_line(e)
        failures.stop_ray()  # no worker log line may arrive after the one that says what happened
        print(f"raysft: error: {line}", file=sys.stderr, flush=True)
        sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)  # the subcommands and recipe flags, before Hydra's own help
    register_configs()
    try:
        if argv[:1] == ["import-recipe"] or (argv and argv[0] != "export" and recipe_flags(argv)):
            from raysft.commands import recipe

            if argv[0] == "import-recipe":
                return recipe.main(argv[1:])
            argv = recipe.rewrite_argv(argv)  # --trl-config FILE -> the preset recipe=trl_file
        if argv and argv[0] in SUBCOMMANDS:
            # Imported on use, as above: each subcommand pulls in its own heavy stack.
            if argv[0] == "export":
                from raysft.commands import export

                return export.main(argv[1:])
            if argv[0] == "plan":
                from raysft.commands import plan

                return plan.main(argv[1:])
            if argv[0] == "upload":
                from raysft.commands import upload

                return upload.main(argv[1:])
            from raysft.commands import data

            return data.dispatch(argv)
        check_override_keys(overrides_in(argv))
    except (OverrideKeyError, ValueError) as e:
        print(f"raysft: error: {e}", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0], *argv]
    _train()
    return 0

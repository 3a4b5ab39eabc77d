"""Preflight: what can be known before Ray starts is checked before Ray starts, each failure one line
that names the setting to change. ``preflight=false`` skips it (experts, air-gapped tricks)."""

from __future__ import annotations

import importlib.util
import uuid

from raysft.config import RaySFTConfig
from raysft.storage import files
from raysft.storage.retry import StorageUnavailableError, retrying
from raysft.storage.rundir import absolute
from raysft.train import model as models

PROBE_TIMEOUT_S = 15.0


class PreflightError(ValueError):
    """The run cannot start as configured (raised before Ray starts)."""


def check_storage(cfg: RaySFTConfig) -> None:
    """A small write, read and delete under ``storage.path``, retried for a few seconds only."""
    root = absolute(cfg.storage.path)
    probe = files.join(root, f".raysft-probe-{uuid.uuid4().hex[:8]}")
    fs, path = files.filesystem(probe)

    def round_trip() -> None:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(b"ok")
        with fs.open_input_stream(path) as f:
            if f.read() != b"ok":
                raise OSError(f"{probe} read back other bytes than were written")
        fs.delete_file(path)

    try:
        retrying(f"write {probe}", round_trip, timeout_s=PROBE_TIMEOUT_S)
    except StorageUnavailableError as e:
        raise PreflightError(f"storage.path={cfg.storage.path} is not reachable ({e.__cause__ or e}): check the "
                             "endpoint and credentials (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), or run with "
                             "storage=local") from None
    except OSError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PreflightError(f"storage.path={cfg.storage.path} cannot be written ({first}): check the bucket exists "
                             "and the credentials may write to it, or run with storage=local") from None


def run_checks(cfg: RaySFTConfig) -> None:
    """Every preflight check, in the order a person would fix them."""
    if not cfg.preflight:
        return
    if cfg.model.init == "pretrained":
        models.check_available(cfg.model)
    check_installed(cfg.trainer.report_to)
    check_storage(cfg)


# report_to name -> (modules, any of which will do; what to install)
_PACKAGES = {"trackio": (("trackio",), "trackio"), "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
             "wandb": (("wandb",), "wandb"), "mlflow": (("mlflow",), "mlflow"), "comet_ml": (("comet_ml",), "comet_ml"),
             "clearml": (("clearml",), "clearml"), "swanlab": (("swanlab",), "swanlab")}


class TrackerNotInstalledError(ValueError):
    """A tracker in ``trainer.report_to`` that cannot be imported (raised before Ray starts)."""


def check_installed(report_to: list[str]) -> None:
    """Every tracker ``trainer.report_to`` names can be imported here, or one line naming the install."""
    for name in report_to:
        modules, pip = _PACKAGES.get(name, ((), ""))
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            raise TrackerNotInstalledError(
                f"trainer.report_to names {name}, which is not installed: pip install {pip} "
                "(or pip install 'raysft[trackers]' for trackio, wandb and tensorboard), or drop it from trainer.report_to")

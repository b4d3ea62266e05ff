"""Weights & Biases for every process of a run: one W&B run per miner or validator.

    tracker = Tracker.start(cfg.wandb, run_dir=cfg.run.dir, name="miner-alice",
                            group=cfg.run.name, job_type="miner", config=cfg.to_json_dict())
    tracker.log({"train/loss": 3.2}, step=window)
    tracker.finish()

Mode `auto` (the default) is `online` when an API key is configured (``WANDB_API_KEY``)
and `offline` otherwise, so nothing ever needs a network: offline runs land in
``<run dir>/wandb/offline-run-*`` and ``wandb sync <folder>`` uploads them later (or view
them locally with ``wandb leet``). ``WANDB_MODE`` in the environment wins over the config
(the test suite sets it to ``disabled``). All processes of one run share the W&B group,
so the dashboard shows the subnet together.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import Field

from common.schema import StrictModel

logger = logging.getLogger(__name__)


class WandbConfig(StrictModel):
    """Weights & Biases: offline unless an API key is set; `wandb sync` uploads later."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "tensormine"
    entity: str | None = None
    dir: Path | None = Field(default=None, description="default: <run.dir>/wandb")


def resolve_mode(cfg: WandbConfig) -> str:
    """online | offline | disabled, from the environment first, then the config."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return "offline" if env == "dryrun" else env
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """A W&B run, or a no-op when tracking is disabled."""

    def __init__(self, run: Any | None, mode: str) -> None:
        self._run = run
        self.mode = mode

    @classmethod
    def start(
        cls,
        cfg: WandbConfig,
        *,
        run_dir: Path,
        name: str,
        group: str,
        job_type: str,
        config: dict[str, Any],
    ) -> Tracker:
        mode = resolve_mode(cfg)
        if mode == "disabled":
            return cls(None, mode)
        wandb = _import_wandb()
        directory = cfg.dir or run_dir
        directory.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=name,
            group=group,
            job_type=job_type,
            dir=str(directory),
            mode=mode,
            config=config,
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        logger.info("W&B %s run %s in %s", mode, name, run.dir)
        return cls(run, mode)

    @property
    def run_dir(self) -> Path | None:
        """The run's folder (``.../wandb/offline-run-*/files``'s parent), if any."""
        return None if self._run is None else Path(self._run.dir).parent

    def log(self, metrics: dict[str, float | int], step: int | None = None) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update(values)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def _import_wandb() -> ModuleType:
    import wandb  # slow to import; only when tracking is on

    return wandb

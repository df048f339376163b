"""A training run's folder, named in this one place; every reader and writer of a run asks here.

  RUN_DIR/config.yaml                 the resolved config, written once every check has passed
  RUN_DIR/checkpoints/<step>/         Orbax steps (train/run_folder.py writes them)
  RUN_DIR/checkpoints/hf_assets/      tokenizer and generation files (io/checkpoint.py: ASSETS_DIR)
  RUN_DIR/logs/metrics.jsonl          every record, one JSON object a line (train/metrics.py)
  RUN_DIR/logs/tensorboard/           the same scalars for TensorBoard
  RUN_DIR/logs/wandb_run.json         the W&B run this run logs to (logging.wandb), so a restart continues it
  RUN_DIR/logs/wandb/                 W&B's own local files, when logging.wandb.dir and WANDB_DIR are unset
                                      (W&B names the folder wandb/ under the logs/ it is given)
  RUN_DIR/compile_cache/              JAX's compiled programs, for the next start (train/compile_cache.py)
"""

from __future__ import annotations

import dataclasses

from etils import epath

CHECKPOINTS = "checkpoints"
LOGS = "logs"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CONFIG = "config.yaml"
COMPILE_CACHE = "compile_cache"
WANDB_RUN = "wandb_run.json"


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where a run keeps each thing, under its root (the config's run_dir)."""

    root: epath.Path

    @classmethod
    def of_checkpoints(cls, folder: epath.Path) -> RunPaths | None:
        """The run whose checkpoints `folder` is (its config and metrics beside it), or None."""
        run = cls(folder.parent)
        if folder.name == CHECKPOINTS and run.config.is_file() and run.metrics.is_file():
            return run
        return None

    @property
    def checkpoints(self) -> epath.Path:
        return self.root / CHECKPOINTS

    @property
    def logs(self) -> epath.Path:
        return self.root / LOGS

    @property
    def metrics(self) -> epath.Path:
        return self.logs / METRICS

    @property
    def tensorboard(self) -> epath.Path:
        return self.logs / TENSORBOARD

    @property
    def config(self) -> epath.Path:
        return self.root / CONFIG

    @property
    def compile_cache(self) -> epath.Path:
        """JAX's persistent compilation cache, when the config's compile_cache is true."""
        return self.root / COMPILE_CACHE

    @property
    def wandb_run(self) -> epath.Path:
        return self.logs / WANDB_RUN

    @property
    def wandb_files(self) -> epath.Path:
        """The folder handed to W&B as its `dir` (it writes wandb/ inside)."""
        return self.logs

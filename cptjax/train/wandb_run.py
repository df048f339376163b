"""Weights & Biases beside metrics.jsonl and TensorBoard (`logging.wandb`; process 0 only).

Each record goes into the W&B history row of its step, its fields flattened under its kind as in
TensorBoard (`train/loss`, `eval/domain/loss`); the resolved config is the W&B run's config, and
`cptjax report` adds its figures to the run's summary (`report/<figure>`). The W&B run id is kept
in the run folder (RunPaths.wandb_run), so every start of a run continues one W&B run
(`resume="allow"`); offline, each start writes one more local run with that id, and `wandb sync`
uploads them in order.

W&B's history only grows: a step it holds cannot be written again, so records of steps the W&B
run already holds are not sent (one message says so). A SIGTERM saves the step it stops at, so a
preempted run resumes right after the last step W&B holds, and W&B's history stays equal to
metrics.jsonl. Two cases differ. After a crash, metrics.jsonl sets aside the records of the steps
after the last checkpoint and logs them again as they are recomputed, while W&B keeps the ones it
had (the same losses, the resume being exact; the timings differ). And the evaluation of a resumed
step that a SIGTERM cut short, run first at the restart, is in metrics.jsonl only.

W&B never stops a run: if wandb is not installed, or starting or logging fails (no network, no API
key), one warning names logging.wandb and what to do, and the run goes on without W&B.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from collections.abc import Callable

from cptjax.core.paths import is_remote
from cptjax.io.run_layout import RunPaths
from cptjax.train.config import WandbSection

HELP = ("check the network and `wandb login`, or set logging.wandb.mode: offline (then `wandb sync` "
        "RUN_DIR/logs/wandb)")


def resolved_mode(section: WandbSection) -> str:
    """The mode W&B runs in: WANDB_MODE when set (as W&B users expect), else the config's."""
    return os.environ.get("WANDB_MODE") or section.mode


def kept_run_id(run: RunPaths) -> str | None:
    """The W&B run id kept in the run folder, or None before its first W&B run started."""
    path = run.wandb_run
    if not path.exists():
        return None
    try:
        return str(json.loads(path.read_text())["id"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not the JSON W&B run record cptjax writes; delete it to log to "
                         "a new W&B run") from None


def keep_run_id(run: RunPaths, section: WandbSection, run_id: str) -> None:
    """Written once the W&B run has started: every later start of the run continues it."""
    run.wandb_run.parent.mkdir(parents=True, exist_ok=True)
    run.wandb_run.write_text(json.dumps({"id": run_id, "project": section.project, "entity": section.entity}) + "\n")


def local_dir(run: RunPaths, section: WandbSection) -> str | None:
    """The folder W&B writes its files under: logging.wandb.dir, else WANDB_DIR (W&B reads it
    itself), else the run folder's logs/ when it is local, else W&B's default (./wandb)."""
    if section.dir is not None:
        return section.dir
    if os.environ.get("WANDB_DIR") or is_remote(run.root):
        return None
    return str(run.wandb_files)


class WandbRun:
    """The W&B run of a training run, or nothing after one warning (see the module docstring).

    `logged_up_to`: the last step the W&B run may already hold (from metrics.jsonl as it was
    before this start, set-aside records included; none if the run folder has no W&B run yet, as
    when logging.wandb is added to a run midway); records of steps up to it are not sent.
    `warn` prints one line; `without` says what goes on without W&B ("training goes on ...").
    """

    def __init__(self, section: WandbSection, run: RunPaths, config: dict, *, logged_up_to: int,
                 warn: Callable[[str], None], without: str):
        self._run = None
        self._warn, self._without = warn, without
        self._skipped = False
        self.failed = False  # W&B failed and is off: the warning was given
        self.logged_up_to = logged_up_to
        mode = resolved_mode(section)
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            self._fail("the wandb package is not installed", "pip install 'cptjax[wandb]'")
            return
        try:
            kept = kept_run_id(run)
            run_id = kept or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            self._run = wandb.init(project=section.project, entity=section.entity, name=section.name or run.root.name,
                                   tags=list(section.tags), mode=mode, dir=local_dir(run, section), config=config,
                                   id=run_id, resume="allow", reinit="create_new")
            if kept is None:
                keep_run_id(run, section, run_id)
                self.logged_up_to = -1  # a new W&B run holds nothing, whatever metrics.jsonl has
        except Exception as err:  # noqa: BLE001 - whatever stops W&B (network, login, a bad id file) must not stop the run
            self._fail(f"W&B did not start ({_one_line(err)})", HELP)
            return
        self.logged_up_to = max(self.logged_up_to, self._run.starting_step - 1)  # online: what the server holds

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, step: int, kind: str, fields: dict) -> None:
        """One record, its fields already flattened ({"source_loss/web": 2.1, ...})."""
        if self._run is None:
            return
        if step <= self.logged_up_to:
            if not self._skipped:
                self._skipped = True
                self._warn(f"logging.wandb: W&B already holds steps up to {self.logged_up_to} from before this "
                           f"start, and a step cannot be written again: step {step}'s {kind} record and any other "
                           "of those steps go to metrics.jsonl only")
            return
        try:
            self._run.log({f"{kind}/{key}": value for key, value in fields.items()}, step=step)
        except Exception as err:  # noqa: BLE001 - a W&B failure mid-run must not stop the run
            self._fail(f"logging to W&B failed at step {step} ({_one_line(err)})", HELP)

    def add_figures(self, figures: dict[str, tuple[str, str]]) -> None:
        """PNG figures {name: (path, caption)} into the run's summary as `report/<name>` images."""
        if self._run is None:
            return
        try:
            import wandb

            self._run.summary.update({f"report/{name}": wandb.Image(path, caption=caption)
                                      for name, (path, caption) in figures.items()})
        except Exception as err:  # noqa: BLE001 - the report is written whatever W&B does
            self._fail(f"adding the figures to W&B failed ({_one_line(err)})", HELP)

    def close(self) -> None:
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            run.finish()
        except Exception as err:  # noqa: BLE001 - the run's own files are complete without W&B
            self._fail(f"W&B did not finish ({_one_line(err)})", HELP)

    def _fail(self, problem: str, fix: str) -> None:
        """The one warning: W&B is off for the rest of the run."""
        self.failed = True
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already failing; the warning below says so
                pass
        self._warn(f"warning: logging.wandb: {problem}; {self._without}; {fix}")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__

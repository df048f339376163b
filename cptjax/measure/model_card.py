"""The model card (README.md) of an HF export of a training run's checkpoint.

`cptjax convert orbax-to-hf` adds it when the checkpoint is a run's own (RUN_DIR/checkpoints, with
RUN_DIR/config.yaml and RUN_DIR/logs/metrics.jsonl beside it). It is written from the run's logs up
to the exported step (run_logs.py): the base model, the data mixture with the target tokens each
source supplied, the schedule and steps, and the before/after table of the base (step 0) against
the last evaluation at or before the exported step.
"""

from __future__ import annotations

from etils import epath

from cptjax.io.run_layout import RunPaths
from cptjax.measure.run_logs import RunLog, mixture_table, read_run, run_summary
from cptjax.train.evaluation import comparison_table, domain_sets

CARD = "README.md"


def run_of_checkpoint(folder: epath.Path) -> epath.Path | None:
    """The run folder whose checkpoints `folder` is, or None."""
    run = RunPaths.of_checkpoints(folder)
    return None if run is None else run.root


def model_card(run: RunLog, step: int, architecture: str, ema: bool = False) -> str:
    """The card's Markdown for the export of checkpoint `step` of `run` (its EMA of the weights with `ema`)."""
    domain = domain_sets(run.eval_names, ()) if run.eval_names else ()
    rows, after = run.before_after(domain, step)
    mixture, covered = run.mixture(up_to=step)
    lines = ["---", "library_name: transformers", "tags:", "- cptjax", "- continued-pretraining", "---", "",
             f"# {run.run_dir.name} (step {step}{', EMA' if ema else ''})", "",
             f"A {architecture} trained with cptjax (`cptjax train`): checkpoint {step} of the run "
             f"`{run.run_dir}`, exported with `cptjax convert orbax-to-hf`"
             + (" --ema: the run's exponential moving average of its weights (training.ema), not the weights "
                "themselves; the held-out numbers below are the weights'." if ema else "."), "",
             "## Training", "", *run_summary(run, step), "", "## Data mixture", "",
             f"Target tokens each source supplied in steps 1-{step}, from the run's logs:", "",
             mixture_table(mixture)]
    if covered < step:
        lines += [f"(The counts cover {covered} of {step} steps: logging windows cut short by a resume are not "
                  "in the logs.)", ""]
    lines += ["## Held-out evaluation: before and after", ""]
    if rows:
        lines += [f"The base model (step 0) against step {after}, in nats/token. Domain set (adaptation, the "
                  f"loss drop): {', '.join(domain)}; the others measure forgetting (the loss rise).", "",
                  comparison_table(rows, before="base (step 0)", after=f"step {after}")]
    else:
        lines += ["The run has no step-0 evaluation and a later one up to this step.", ""]
    return "\n".join(lines) + "\n"


def write_model_card(out: epath.Path, checkpoint_dir: epath.Path, step: int, architecture: str,
                     ema: bool = False) -> bool:
    """Writes README.md into the export folder `out` if `checkpoint_dir` is a run's; True if it did."""
    root = run_of_checkpoint(checkpoint_dir)
    if root is None:
        return False
    (out / CARD).write_text(model_card(read_run(root, "--ckpt"), step, architecture, ema))
    return True

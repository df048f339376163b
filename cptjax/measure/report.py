"""`cptjax report RUN_DIR`: what a training run did, in a Markdown report with PNG plots.

Read from the run's own folder (run_logs.py): training loss overall and per source, held-out loss
per set over steps with the base's step-0 value marked (adaptation and forgetting curves), the
learning rate, realized source shares against the configured weights, tokens/s, and the
before/after table of the base (step 0) against the last evaluation. When the logs have them, the
long-context section: held-out loss by position bucket (first and last evaluation, and curves over
steps) and the pass-key probe's accuracy by prompt length and needle depth (heat maps). The report folder
(default RUN_DIR/report-step<N>, N the last logged step) holds report.md, report.json (the
tables' numbers), one PNG per plot and overview.png with all of them; it is written whole or not
at all, and an existing one is never replaced. A run with `logging.wandb` also gets the figures in
its W&B run's summary (`report/<plot>`), unless W&B is unreachable (one warning, the report is
written all the same).
"""

from __future__ import annotations

import dataclasses
import json
import sys

from etils import epath

from cptjax.core.atomic_dir import atomic_output_dir, check_output_dir
from cptjax.core.config_tree import to_dict
from cptjax.core.paths import PathLike, user_path
from cptjax.io.run_layout import RunPaths
from cptjax.measure.plots import (
    EXPERTS_CAPTION,
    GOODPUT_CAPTION,
    save_experts_figure,
    save_goodput_figure,
    save_long_context_figures,
    save_report_figures,
    save_task_figure,
)
from cptjax.measure.run_logs import RunLog, mixture_table, read_run, run_summary
from cptjax.train.evaluation import comparison_table, domain_sets, markdown_table
from cptjax.train.harness import headline_metric
from cptjax.train.retrieval import retrieval_table
from cptjax.train.wandb_run import WandbRun

CAPTIONS = {
    "training_loss": "Training loss of each logged step's batch, overall and per source.",
    "heldout_loss": "Held-out loss per eval set over steps; the star and dashed line mark the base model "
                    "(step 0). A falling domain curve is adaptation, a rising general curve forgetting.",
    "heldout_change": "The same, as the change from the base: below 0 is better than the base.",
    "learning_rate": "The configured re-warm schedule, and the learning rate the logged steps applied.",
    "source_shares": "Each source's share of the target tokens per logging window (thin line) against its "
                     "configured weight (wide pale line).",
    "throughput": "Training tokens per second (batch x seq_len over the step time).",
}
LONG_CONTEXT_CAPTIONS = {
    "position_loss": "Held-out loss per position bucket over steps (positions counted from each document's "
                     "start in the row). Far buckets falling below near ones: the model uses its far context.",
    "retrieval": "Pass-key retrieval: the share of keys the model retrieves by greedy decoding, by prompt "
                 "length and the needle's depth; the first probe of the run beside the last.",
}

TASKS_CAPTION = ("Each task's score over steps; the dashed line and star are the base model at step 0. A falling "
                 "accuracy (rising perplexity) is forgetting.")


@dataclasses.dataclass(frozen=True)
class Report:
    out: epath.Path
    markdown: str
    numbers: dict  # what report.json holds
    figures: dict[str, str]
    wandb: bool = False  # the figures went to the run's W&B run


def default_out(run: RunLog) -> epath.Path:
    return run.run_dir / f"report-step{run.last_step}"


def write_report(run_dir: PathLike, out: PathLike | None = None, domain: tuple[str, ...] = (),
                 extra: str = "") -> Report:
    """Writes the report of `run_dir` into the new folder `out`; `extra` is Markdown appended at
    the end (the demo adds its generations)."""
    run = read_run(run_dir)
    out = check_output_dir(user_path(out, "--out") if out else default_out(run))
    domain = domain_sets(run.eval_names, domain) if run.eval_names else ()
    rows, after_step = run.before_after(domain)
    mixture, covered = run.mixture()
    numbers = {"run_dir": str(run.run_dir), "last_step": run.last_step, "domain_sets": list(domain),
               "before_after": {"base_step": 0 if rows else None, "after_step": after_step, "rows": rows},
               "mixture": {"rows": mixture, "steps_covered": covered},
               "position_loss": _position_losses(run), "retrieval": run.retrieval[:1] + run.retrieval[1:][-1:],
               "tasks": _task_scores(run), "goodput": run.goodput}
    with atomic_output_dir(out) as tmp:
        figures = (save_report_figures(run, tmp, domain) | save_long_context_figures(run, tmp)
                   | save_task_figure(run, tmp) | save_experts_figure(run, tmp) | save_goodput_figure(run, tmp))
        text = _markdown(run, rows, after_step, mixture, covered, figures, domain) + extra
        (tmp / "report.md").write_text(text)
        (tmp / "report.json").write_text(json.dumps(numbers, indent=2) + "\n")
    return Report(out, text, numbers, figures, _to_wandb(run, out, figures))


def _to_wandb(run: RunLog, out: epath.Path, figures: dict[str, str]) -> bool:
    """The figures into the summary of the run's W&B run, when it logs to one; True if they went."""
    section = run.config.logging.wandb
    if section is None:
        return False
    captions = CAPTIONS | LONG_CONTEXT_CAPTIONS | {"tasks": TASKS_CAPTION, "experts": EXPERTS_CAPTION,
                                                   "goodput": GOODPUT_CAPTION,
                                                   "overview": "All the plots of the report."}
    warn = lambda text: print(f"cptjax report: {text}", file=sys.stderr, flush=True)  # noqa: E731
    wandb = WandbRun(section, RunPaths(run.run_dir), to_dict(run.config), logged_up_to=run.last_step, warn=warn,
                     without="the report is written without it")
    started = wandb.active
    wandb.add_figures({name: (str(out / file), captions.get(name, name)) for name, file in figures.items()})
    wandb.close()
    return started and not wandb.failed


def _markdown(run: RunLog, rows, after_step, mixture, covered, figures, domain) -> str:
    lines = [f"# Run report: {run.run_dir.name}", "", *run_summary(run), "",
             f"![overview]({figures['overview']})", "", "## Before and after", ""]
    if rows:
        lines += [f"The base model (step 0) against step {after_step}. Domain sets (adaptation: the loss "
                  f"drop): {', '.join(domain)}; the others measure forgetting (the loss rise). Losses in "
                  "nats/token.", "", comparison_table(rows, before="base (step 0)", after=f"step {after_step}")]
    else:
        lines += ["No before/after table: the run has no step-0 evaluation and a later one yet "
                  "(eval.at_start and eval.every set when they happen).", ""]
    lines += ["## Data mixture", "", mixture_table(mixture)]
    if covered < run.last_step:
        lines += [f"Token counts cover {covered} of {run.last_step} steps (logging windows cut short by a "
                  "resume are not in the logs).", ""]
    lines += _tasks(run, figures)
    lines += _long_context(run, figures)
    lines += _experts(run, figures)
    lines += _goodput(run, figures)
    lines += ["## Plots", ""]
    for name, caption in CAPTIONS.items():
        lines += [f"![{name}]({figures[name]})", "", caption, ""]
    return "\n".join(lines) + "\n"


def _task_scores(run: RunLog) -> dict[str, dict]:
    """{task: {"metric", "first_step", "first", "last_step", "last"}}: each lm-eval task's headline
    score at its first evaluation (the base when that is step 0) and its last."""
    out = {}
    for name in run.task_names:
        logged = [r for r in run.tasks if name in r]
        metric = headline_metric(logged[0][name])
        out[name] = {"metric": metric, "first_step": logged[0]["step"], "first": logged[0][name].get(metric),
                     "last_step": logged[-1]["step"], "last": logged[-1][name].get(metric)}
    return out


def _tasks(run: RunLog, figures: dict[str, str]) -> list[str]:
    scores = _task_scores(run)
    if not scores:
        return []
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    rows = [[name, s["metric"], f"{fmt(s['first'])} (step {s['first_step']})",
             f"{fmt(s['last'])} (step {s['last_step']})",
             "n/a" if None in (s["first"], s["last"]) else f"{s['last'] - s['first']:+.4f}"]
            for name, s in scores.items()]
    return ["## Downstream tasks", "", "lm-evaluation-harness scores logged during training (eval.tasks): each "
            "task's first evaluation (the base, when it is step 0) against its last.", "",
            markdown_table(["task", "metric", "first", "last", "change"], rows),
            f"![tasks]({figures['tasks']})", "", TASKS_CAPTION, ""]


def _experts(run: RunLog, figures: dict[str, str]) -> list[str]:
    """A mixture-of-experts run's routing: each layer's expert-load entropy and largest share,
    first logged step against the last."""
    records = [r for r in run.train if "router" in r]
    if not records:
        return []
    first, last = (r["router"] for r in (records[0], records[-1]))
    layers = last.get("layers", range(len(last["load_entropy"])))  # the MoE layers' indices
    rows = [[str(layer), f"{first['load_entropy'][i]:.3f}", f"{last['load_entropy'][i]:.3f}",
             f"{max(first['expert_load'][i]):.3f}", f"{max(last['expert_load'][i]):.3f}"]
            for i, layer in enumerate(layers)]
    steps = records[0]["step"], records[-1]["step"]
    return ["## Experts", "", f"Routing per layer, step {steps[0]} against step {steps[1]}: the normalised "
            "entropy of the experts' shares of routed tokens (1: even) and the largest share (a few experts taking "
            f"most tokens on the new domain is routing collapse). Load-balancing loss: {first['aux_loss']:.4f} "
            f"-> {last['aux_loss']:.4f}.", "",
            markdown_table(["layer", f"entropy, step {steps[0]}", f"entropy, step {steps[1]}",
                            f"largest share, step {steps[0]}", f"largest share, step {steps[1]}"], rows),
            f"![experts]({figures['experts']})", "", EXPERTS_CAPTION, ""]


def _goodput(run: RunLog, figures: dict[str, str]) -> list[str]:
    """Each start's goodput account (train/goodput.py), and the run's over all of them."""
    if not run.goodput:
        return []
    parts = ("step", "compile", "startup", "data", "eval", "checkpoint", "logging", "other")
    rows = [[str(i + 1), f"{r['start_step']}-{r['step']}", f"{r['wall_s']:.1f}", f"{r['goodput']:.1%}",
             *(f"{r[f'{p}_s']:.1f}" for p in parts[1:]), f"{r['lost_s']:.1f}"] for i, r in enumerate(run.goodput)]
    wall = sum(r["wall_s"] for r in run.goodput)
    lost = sum(r["lost_s"] for r in run.goodput)
    stepped = sum(r["step_s"] for r in run.goodput)
    rows.append(["all", "", f"{wall:.1f}", f"{stepped / wall:.1%}" if wall else "",
                 *(f"{sum(r[f'{p}_s'] for r in run.goodput):.1f}" for p in parts[1:]), f"{lost:.1f}"])
    return ["## Where the time went", "", f"Goodput, the share of wall time spent in train steps, over "
            f"{len(run.goodput)} start(s) of the run: {stepped / wall:.1%} ({stepped:.1f} of {wall:.1f} s; "
            f"restarts recomputed steps worth {lost:.1f} s more). Seconds per part:", "",
            markdown_table(["start", "steps", "wall", "goodput", *parts[1:], "lost to restart"], rows),
            f"![goodput]({figures['goodput']})", "", GOODPUT_CAPTION, ""]


def _position_losses(run: RunLog) -> dict[str, dict]:
    """{set: {"first_step", "last_step", "first", "last"}}: the loss by position bucket of the
    first and the last evaluation that logged it."""
    out = {}
    for name in run.eval_names:
        logged = [r for r in run.evals if "position_loss" in r.get(name, {})]
        if logged:
            out[name] = {"first_step": logged[0]["step"], "last_step": logged[-1]["step"],
                         "first": logged[0][name]["position_loss"], "last": logged[-1][name]["position_loss"]}
    return out


def _long_context(run: RunLog, figures: dict[str, str]) -> list[str]:
    positions = _position_losses(run)
    if not positions and not run.retrieval:
        return []
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    lines = ["## Long context", ""]
    for name, p in positions.items():
        rows = [[label, fmt(p["first"].get(label)), fmt(p["last"].get(label)),
                 "n/a" if None in (p["first"].get(label), p["last"].get(label))
                 else f"{p['last'][label] - p['first'][label]:+.4f}"] for label in run.position_labels(name)]
        lines += [f"Held-out loss of `{name}` by position in the document (nats/token), step {p['first_step']} "
                  f"against step {p['last_step']}:", "",
                  markdown_table(["positions", f"step {p['first_step']}", f"step {p['last_step']}", "change"], rows)]
    for record in run.retrieval[:1] + run.retrieval[1:][-1:]:
        lines += [f"Pass-key retrieval at step {record['step']}: {record['accuracy']:.0%} of the keys retrieved by "
                  f"greedy decoding ({record['samples']} prompts per cell; in brackets the answer's mean NLL, "
                  "nats/token).", "", retrieval_table(record)]
    for name, caption in LONG_CONTEXT_CAPTIONS.items():
        if name in figures:
            lines += [f"![{name}]({figures[name]})", "", caption, ""]
    return lines

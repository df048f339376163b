"""The PNG figures of run reports and merge sweeps (matplotlib's object API: no pyplot, no display).

Each panel is a function that draws on one Axes, so a report saves it alone and in the overview
grid. Every panel has a title, axis labels with units and a legend: a reader should understand
the run from the pictures alone.
"""

from __future__ import annotations

import numpy as np
from etils import epath
from matplotlib import cm
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from cptjax.measure.run_logs import RunLog
from cptjax.train.harness import headline_metric
from cptjax.train.retrieval import accuracy_grid
from cptjax.train.schedules import make_schedule

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
          "tab:olive", "tab:cyan")
LOSS = "loss (nats/token)"


def _color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def draw_training_loss(ax: Axes, run: RunLog) -> None:
    steps = [r["step"] for r in run.train]
    ax.plot(steps, [r["loss"] for r in run.train], color="black", lw=1.6, label="all sources")
    for i, name in enumerate(run.source_names):
        points = [(r["step"], r["source_loss"][name]) for r in run.train if name in r.get("source_loss", {})]
        if points:
            ax.plot(*zip(*points), color=_color(i), lw=1, alpha=0.85, label=f"source: {name}")
    ax.set(title="Training loss (each logged step's batch)", xlabel="step", ylabel=LOSS)
    _legend(ax)


def draw_heldout(ax: Axes, run: RunLog, domain: tuple[str, ...], change: bool = False) -> None:
    """Held-out loss per set over steps (or its change from step 0), the base's value marked."""
    base = run.base_eval()
    drawn = False
    for i, name in enumerate(run.eval_names):
        points = [(r["step"], r[name]["loss"]) for r in run.evals if name in r]
        reference = base[name]["loss"] if base and name in base else None
        if change:
            if reference is None:
                continue
            points = [(s, v - reference) for s, v in points]
        role = "domain (adaptation)" if name in domain else "general (forgetting)"
        ax.plot(*zip(*points), color=_color(i), marker="o", ms=4, lw=1.5, label=f"{name}: {role}")
        drawn = True
        if reference is not None and not change:
            ax.axhline(reference, color=_color(i), ls="--", lw=0.9)
            ax.plot([0], [reference], color=_color(i), marker="*", ms=13, ls="none")
    if change:
        if drawn:
            ax.axhline(0.0, color="black", lw=0.9, label="the base (step 0)")
        ax.set(title="Held-out loss change from the base (step 0)", xlabel="step",
               ylabel="loss - base loss (nats/token)\nbelow 0: better than the base")
    else:
        ax.set(title="Held-out loss (star, dashed: the base at step 0)", xlabel="step", ylabel=LOSS)
    _legend(ax, "no held-out evaluation (with a step-0 base) in the logs" if change else
            "no held-out evaluation in the logs")


def draw_learning_rate(ax: Axes, run: RunLog) -> None:
    steps = np.arange(1, run.config.training.steps + 1)
    # train_step applies schedule(updates done before it) = schedule(N - 1) at step N.
    ax.plot(steps, np.asarray(make_schedule(run.config.schedule)(steps - 1)), color="tab:blue", lw=1.5,
            label="the configured schedule")
    ax.plot([r["step"] for r in run.train], [r["learning_rate"] for r in run.train], color="black",
            marker=".", ls="none", label="logged steps (applied)")
    stages = run.stage_weights()[1:]
    for k, (start, _) in enumerate(stages):
        ax.axvline(start - 0.5, color="gray", ls=":", lw=1, label="new data stage" if k == 0 else None)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set(title=f"Learning rate ({run.config.schedule.kind} schedule)", xlabel="step", ylabel="learning rate")
    _legend(ax)


def draw_source_shares(ax: Axes, run: RunLog) -> None:
    """Each step is the unit cell around its number: a stage from step a to b covers [a - 0.5, b + 0.5],
    and a logging window of w steps ending at step s covers [s - w + 0.5, s + 0.5]."""
    stages = run.stage_weights()
    last = max(run.last_step, 1)
    for i, name in enumerate(run.source_names):
        xs, ys = [], []
        for k, (start, weights) in enumerate(stages):
            end = stages[k + 1][0] - 1 if k + 1 < len(stages) else last
            xs += [start - 0.5, end + 0.5]
            ys += [weights[name]] * 2
        # Wide and pale behind the realized line, so both show where they coincide.
        ax.plot(xs, ys, color=_color(i), lw=6, alpha=0.3, solid_capstyle="butt",
                label=f"{name}: configured weight")
        xs, ys = [], []
        for r in run.train:
            if name in r.get("source_share", {}):
                xs += [r["step"] - r.get("window_steps", 1) + 0.5, r["step"] + 0.5]
                ys += [r["source_share"][name]] * 2
        if xs:
            ax.plot(xs, ys, color=_color(i), lw=1.5, label=f"{name}: realized")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(-0.02, 1.02)
    ax.set(title="Source mixture: share of target tokens per logging window", xlabel="step",
           ylabel="share of tokens")
    _legend(ax)


def draw_throughput(ax: Axes, run: RunLog) -> None:
    points = [(r["step"], r["tokens_per_s"]) for r in run.train if "tokens_per_s" in r]
    if points:
        ax.plot(*zip(*points), color="tab:green", marker=".", lw=1, label="tokens/s (batch x seq_len)")
    _legend(ax)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_ylim(bottom=0)
    ax.set(title="Training throughput (eval and save time excluded)", xlabel="step", ylabel="tokens per second")


def draw_position_loss(ax: Axes, run: RunLog, name: str) -> None:
    """Held-out loss of set `name` per position bucket over steps: one line per bucket, near
    positions pale, far ones dark. Far buckets falling relative to near ones: the model learns to
    use its far context."""
    labels = run.position_labels(name)
    shades = cm.viridis_r(np.linspace(0.15, 1.0, len(labels)))
    for shade, label in zip(shades, labels):
        points = [(r["step"], r[name]["position_loss"][label]) for r in run.evals
                  if r.get(name, {}).get("position_loss", {}).get(label) is not None]
        if points:
            ax.plot(*zip(*points), color=shade, marker="o", ms=3, lw=1.3, label=f"positions {label}")
    ax.set(title=f"Held-out loss by position in the document: {name}", xlabel="step", ylabel=LOSS)
    _legend(ax, "no loss by position in the logs")


def draw_retrieval(ax: Axes, record: dict) -> None:
    """Pass-key accuracy of one probe record as a heat map: prompt length (rows) by needle depth;
    each cell also gives the answer's mean NLL (nats/token), which moves before accuracy does."""
    grid, nll = accuracy_grid(record), accuracy_grid(record, "answer_nll")
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.0%}\nanswer NLL {nll[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(record["depths"])), [f"{d:g}" for d in record["depths"]])
    ax.set_yticks(range(len(record["lengths"])), [f"{n:,}" for n in record["lengths"]])
    ax.figure.colorbar(image, ax=ax, format=PercentFormatter(1.0), label="keys retrieved (greedy)")
    ax.set(title=f"Pass-key retrieval at step {record['step']}: {record['accuracy']:.0%} overall",
           xlabel="needle depth (0: start of the prompt, 1: just before the question)",
           ylabel="prompt length (tokens)")


def draw_tasks(ax: Axes, run: RunLog, name: str) -> None:
    """Task `name`'s headline score over steps, the step-0 score (the base) dashed and starred:
    a falling accuracy (or a rising perplexity) is forgetting the model's earlier skills."""
    metric = headline_metric(next(r[name] for r in run.tasks if name in r))
    points = [(r["step"], r[name][metric]) for r in run.tasks if metric in r.get(name, {})]
    ax.plot(*zip(*points), color="tab:blue", marker="o", ms=4, lw=1.5, label=f"{name}: {metric}")
    if points[0][0] == 0:
        ax.axhline(points[0][1], color="tab:blue", ls="--", lw=0.9, label="the base (step 0)")
        ax.plot([0], [points[0][1]], color="tab:blue", marker="*", ms=13, ls="none")
    better = "lower is better" if "perplexity" in metric or metric.endswith("bits_per_byte") else "higher is better"
    ax.set(title=f"Task {name}", xlabel="step", ylabel=f"{metric} ({better})")
    _legend(ax)


def save_task_figure(run: RunLog, out: epath.Path) -> dict[str, str]:
    """tasks.png: one panel per lm-eval task logged during training ({} when there are none)."""
    names = run.task_names
    if not names:
        return {}
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig = Figure(figsize=(5.5 * columns, 3.8 * rows), layout="constrained")
    for ax, name in zip(np.atleast_1d(fig.subplots(rows, columns)).flat, names):
        draw_tasks(ax, run, name)
    for ax in np.atleast_1d(fig.axes)[len(names):]:
        ax.set_visible(False)
    return {"tasks": _save(fig, out, "tasks.png")}


EXPERTS_CAPTION = ("Mixture of experts: the load-balancing loss (1 when every expert takes an equal share; "
                   "higher when a few take most tokens), each layer's normalised entropy of the experts' "
                   "shares over steps (1: even, 0: one expert takes every token: routing collapse), and the "
                   "shares at the last logged step, layer by layer.")


def save_experts_figure(run: RunLog, out: epath.Path) -> dict[str, str]:
    """experts.png for a mixture-of-experts run ({} for a dense one): the router's logged metrics."""
    records = [r for r in run.train if "router" in r]
    if not records:
        return {}
    steps = [r["step"] for r in records]
    fig = Figure(figsize=(18, 4.6), layout="constrained")
    aux, entropy, load = fig.subplots(1, 3)
    aux.plot(steps, [r["router"]["aux_loss"] for r in records], color="tab:red", lw=1.3)
    aux.axhline(1.0, color="gray", ls="--", lw=0.9, label="perfect balance")
    aux.set(title="Load-balancing loss", xlabel="step", ylabel="loss (before its coefficient)")
    _legend(aux)
    curves = np.asarray([r["router"]["load_entropy"] for r in records])  # [steps, MoE layers]
    layers = records[-1]["router"].get("layers", list(range(curves.shape[1])))
    for i, layer in enumerate(layers):
        entropy.plot(steps, curves[:, i], lw=1.0, color=_color(i), label=f"layer {layer}")
    entropy.set(title="Expert-load entropy per layer", xlabel="step", ylabel="normalised entropy", ylim=(0, 1.02))
    if curves.shape[1] <= 12:
        _legend(entropy)
    shares = np.asarray(records[-1]["router"]["expert_load"])  # [Ly, E]
    image = load.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
    load.set(title=f"Expert shares at step {steps[-1]}", xlabel="expert", ylabel="layer")
    load.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(layers) != layers[-1] + 1:  # some layers are dense: the rows are the MoE layers, by index
        load.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    else:
        load.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=load, label="share of routed tokens")
    return {"experts": _save(fig, out, "experts.png")}


GOODPUT_CAPTION = ("Where each start of the run spent its wall time (train steps are goodput); a restart's "
                   "recomputed steps (time lost to the restart) are drawn past the wall time.")
GOODPUT_COLORS = {"step": "tab:green", "compile": "tab:red", "startup": "tab:gray", "data": "tab:orange",
                  "eval": "tab:blue", "checkpoint": "tab:purple", "logging": "tab:olive", "other": "lightgray",
                  "lost": "black"}


def save_goodput_figure(run: RunLog, out: epath.Path) -> dict[str, str]:
    """goodput.png: one stacked bar per run segment, its wall time by part ({} without accounts)."""
    if not run.goodput:
        return {}
    fig = Figure(figsize=(10, 3.0 + 0.45 * len(run.goodput)), layout="constrained")
    ax = fig.add_subplot()
    labels = [f"start {i + 1} (steps {r['start_step']}-{r['step']})" for i, r in enumerate(run.goodput)]
    left = np.zeros(len(run.goodput))
    for part, color in GOODPUT_COLORS.items():
        widths = np.asarray([r.get(f"{part}_s", 0.0) for r in run.goodput])
        if widths.any():
            ax.barh(labels, widths, left=left, color=color, label=part, hatch="//" if part == "lost" else None)
            left += widths
    ax.invert_yaxis()
    ax.set(title="Goodput: wall time by part, per start of the run", xlabel="seconds")
    fig.legend(ncols=9, fontsize=8, loc="outside lower center")
    return {"goodput": _save(fig, out, "goodput.png")}


def save_long_context_figures(run: RunLog, out: epath.Path) -> dict[str, str]:
    """position_loss.png (one panel per eval set with buckets) and retrieval.png (the first and the
    last probe), each only when the logs have it; returns {figure: file name}."""
    files = {}
    names = [n for n in run.eval_names if run.position_labels(n)]
    if names:
        fig = Figure(figsize=(7 * len(names), 4.2), layout="constrained")
        for ax, name in zip(np.atleast_1d(fig.subplots(1, len(names))), names):
            draw_position_loss(ax, run, name)
        files["position_loss"] = _save(fig, out, "position_loss.png")
    records = run.retrieval[:1] + run.retrieval[1:][-1:]
    if records:
        fig = Figure(figsize=(6.5 * len(records), 4.5), layout="constrained")
        for ax, record in zip(np.atleast_1d(fig.subplots(1, len(records))), records):
            draw_retrieval(ax, record)
        files["retrieval"] = _save(fig, out, "retrieval.png")
    return files


def save_report_figures(run: RunLog, out: epath.Path, domain: tuple[str, ...]) -> dict[str, str]:
    """One PNG per panel, and overview.png with all of them; returns {panel: file name}."""
    panels = {
        "training_loss": lambda ax: draw_training_loss(ax, run),
        "heldout_loss": lambda ax: draw_heldout(ax, run, domain),
        "heldout_change": lambda ax: draw_heldout(ax, run, domain, change=True),
        "learning_rate": lambda ax: draw_learning_rate(ax, run),
        "source_shares": lambda ax: draw_source_shares(ax, run),
        "throughput": lambda ax: draw_throughput(ax, run),
    }
    files = {}
    for name, draw in panels.items():
        fig = Figure(figsize=(7, 4.2), layout="constrained")
        draw(fig.add_subplot())
        files[name] = _save(fig, out, f"{name}.png")
    fig = Figure(figsize=(18, 9.5), layout="constrained")
    fig.suptitle(f"cptjax run {run.run_dir.name}: {run.last_step} steps", fontsize=14)
    for ax, draw in zip(fig.subplots(2, 3).flat, panels.values()):
        draw(ax)
    files["overview"] = _save(fig, out, "overview.png", dpi=80)  # small enough to commit beside a README
    return files


def save_sweep_figure(sweep: dict, out: epath.Path) -> str:
    """Loss per set against alpha, and the trade-off: forgetting (x) against adaptation (y)."""
    fig = Figure(figsize=(13, 5), layout="constrained")
    left, right = fig.subplots(1, 2)
    alphas = [p["alpha"] for p in sweep["points"]]
    for i, name in enumerate(sweep["sets"]):
        role = "domain" if name in sweep["domain"] else "general"
        left.plot(alphas, [p["results"][name]["loss"] for p in sweep["points"]], color=_color(i), marker="o",
                  label=f"{name} ({role})")
        left.axhline(sweep["base"][name]["loss"], color=_color(i), ls="--", lw=0.9)
    best = sweep["best"]
    if best is not None:
        left.axvline(best["alpha"], color="black", ls=":", label=f"best alpha {best['alpha']:g}")
    left.set(title="Held-out loss of the merge (dashed: the base)",
             xlabel="alpha (0: base, 1: tuned)", ylabel=LOSS)
    _legend(left)

    xs = [p["forgetting"] for p in sweep["points"]]
    ys = [p["adaptation"] for p in sweep["points"]]
    right.plot(xs, ys, color="tab:blue", marker="o")
    for p in sweep["points"]:
        right.annotate(f"alpha {p['alpha']:g}", (p["forgetting"], p["adaptation"]), textcoords="offset points",
                       xytext=(6, -10), fontsize=8)
    right.axvline(sweep["max_forgetting"], color="tab:red", ls="--",
                  label=f"forgetting tolerance {sweep['max_forgetting']:g}")
    right.axvspan(min(min(xs), 0.0) - 0.01, sweep["max_forgetting"], color="tab:green", alpha=0.08,
                  label="within the tolerance")
    if best is not None:
        right.plot([best["forgetting"]], [best["adaptation"]], marker="*", ms=18, color="gold",
                   markeredgecolor="black", ls="none", label=f"best within tolerance: alpha {best['alpha']:g}")
    right.set(title=f"Adaptation against forgetting ({sweep['method']} merges, labelled by alpha)",
              xlabel="forgetting: worst general-set loss rise over the base (nats/token)",
              ylabel="adaptation: domain loss drop from the base (nats/token)")
    _legend(right)
    return _save(fig, out, "sweep.png")


def draw_weight_change(ax: Axes, change) -> None:
    """Relative change from the base per layer, one line per parameter kind (a WeightChange)."""
    for i, (kind, values) in enumerate(change.layers.items()):
        if not np.isnan(values).all():  # zero-initialised biases have no relative change
            ax.plot(range(len(values)), values, color=_color(i), ls="-" if i < len(COLORS) else "--",
                    marker="o", ms=3, lw=1.2, label=kind)
    ax.set_yscale("log")
    ax.set(title="Weight change from the base, per layer", xlabel="layer",
           ylabel="||W - W_base|| / ||W_base||")
    _legend(ax)


def save_weight_change_figure(change, out: epath.Path, name: str = "weight_change.png") -> str:
    """The per-layer lines, and a bar for each parameter outside the layers (embeddings, final norm)."""
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(3, 1))
    draw_weight_change(left, change)
    names = list(change.other)
    right.bar(range(len(names)), [change.other[n] for n in names], color="tab:gray")
    right.set_xticks(range(len(names)), names, rotation=30, ha="right")
    right.set(title="Outside the layers", ylabel="||W - W_base|| / ||W_base||")
    fig.suptitle(f"{change.tuned} against {change.base}", fontsize=10)
    return _save(fig, out, name)


def _legend(ax: Axes, empty: str = "nothing logged for this plot yet") -> None:
    """A legend, or the note `empty` when the panel has nothing to show."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", color="gray")


def _save(fig: Figure, out: epath.Path, name: str, dpi: int = 110) -> str:
    with (out / name).open("wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return name

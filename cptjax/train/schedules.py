"""Learning-rate schedules for continued pretraining, built from one `ScheduleConfig`.

`make_schedule(config)` returns an `optax.Schedule`: a pure `step -> lr` that takes Python ints and
traced int32 steps under `jax.jit` and returns a float32 scalar. The kinds:

- "warmup_cosine" (default): linear re-warm from `init_lr` to `peak_lr`, cosine to `end_lr` at
  `total_steps`, `end_lr` after.
- "wsd": warmup, `peak_lr` held, then a cooldown over the last `cooldown` steps to `end_lr`, shaped
  "linear", "cosine" or "1-sqrt" (`end + (peak - end) * (1 - sqrt(p))`, p in [0, 1]; Hägele et al. 2024).
- "constant": `peak_lr` throughout; a warmup and a WSD-style cooldown only if asked for.
- "infinite" (Ibrahim et al. 2024): warmup, cosine from `peak_lr` to `constant_lr` over `decay` steps
  (the paper's "cooldown"), `constant_lr` held, then an anneal to `end_lr` over the last `anneal`
  steps. The paper anneals with a fast exponential-style decay; here the anneal is linear by default
  (`anneal_shape` "cosine" is the other choice) because an exponential is undefined for the usual
  `end_lr = 0`, never reaches `end_lr` exactly, and a linear decay-to-end is what the WSD cooldown
  studies (Hägele et al. 2024) found as good as cosine.
- "cycles": one re-warmed segment per data stage; stage k runs from step stage_boundaries[k-1]
  to the step before stage_boundaries[k] and is a warmup_cosine or wsd segment of its own length,
  re-warming from `init_lr` to its own peak (`stage_peak_lrs`, or `peak_lr`).

Steps count optimizer updates from 1, as the logs, checkpoints and data stages do: step N is the
N-th update, and its lr is the schedule at N - 1, the update's 0-based count (what optax passes).
A stage boundary S is the first step of its stage: step S gets the stage's first warmup lr.

For CPT, re-warm to roughly 10% of the original pretraining peak with a short warmup (1-3% of steps);
the defaults (init_lr 0, warmup 1%) follow that, the peak is the caller's to choose.

Step 0 (`count_from_one`, on by default). optax passes the optimizer's update count, which starts at
0, and a warmup from `init_lr = 0` then makes the first update a no-op (torchtitan shipped exactly
that). Here each segment is a curve c(t) with c(0) = init_lr, c(warmup) = peak_lr and
c(length) = end_lr, and update s (counted from 0 within the segment) gets c(s + 1). So the first
update gets `init_lr + (peak_lr - init_lr) / warmup_steps` (nonzero), update `warmup_steps - 1` is
the first at `peak_lr`, and update `total_steps - 1`, the last of `total_steps`, gets exactly
`end_lr`. `count_from_one=False` gives optax's convention: update s gets c(s), update 0 gets `init_lr`.

Lengths (`warmup`, `cooldown`, `decay`, `anneal`) are an int number of steps or a float fraction in
(0, 1) of the segment (`total_steps`, or the stage's length for "cycles"); a fraction becomes
`max(1, round(fraction * length))` steps, so a nonzero fraction never silently means no phase.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from cptjax.core.errors import CptjaxError

Kind = Literal["warmup_cosine", "wsd", "constant", "infinite", "cycles"]
CooldownShape = Literal["linear", "cosine", "1-sqrt"]
AnnealShape = Literal["linear", "cosine"]
StageKind = Literal["warmup_cosine", "wsd"]
KINDS: tuple[str, ...] = typing.get_args(Kind)

DEFAULT_WARMUP = 0.01  # CPT re-warms briefly: 1-3% of steps
DEFAULT_COOLDOWN = 0.2  # Hägele et al. 2024: a 20% cooldown matches cosine
DEFAULT_DECAY = 0.1  # "infinite": peak -> constant_lr
DEFAULT_ANNEAL = 0.1  # "infinite": constant_lr -> end_lr

Length = int | float  # steps (int) or a fraction in (0, 1) of the segment (float)

# Which optional fields each kind reads. Setting one a kind does not read is an error rather than
# silently ignored: a cooldown on "warmup_cosine" most likely means the user wanted "wsd".
_USES: dict[str, frozenset[str]] = {
    "warmup_cosine": frozenset({"warmup"}),
    "wsd": frozenset({"warmup", "cooldown", "cooldown_shape"}),
    "constant": frozenset({"warmup", "cooldown", "cooldown_shape"}),
    "infinite": frozenset({"warmup", "constant_lr", "decay", "anneal", "anneal_shape"}),
    "cycles": frozenset({"warmup", "cooldown", "cooldown_shape", "stage_boundaries",
                         "stage_peak_lrs", "stage_kind"}),
}
_OPTIONAL = frozenset().union(*_USES.values())


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """One learning-rate schedule. Optional fields left as None take the kind's default (see
    `warmup_steps` and friends); setting a field that `kind` does not use is an error.

    Field types are checked where configs are read (cptjax.core.config_tree); the checks here are on
    values and on how the fields fit together."""

    # the schedule's length; in a training config it is training.steps, not a key of its own
    total_steps: int = dataclasses.field(metadata={"set_from": "training.steps"})
    peak_lr: float  # the re-warm's target: about 10% of the original pretraining peak for CPT
    kind: Kind = "warmup_cosine"  # the shape (docs/training.md, "Defences against forgetting")
    init_lr: float = 0.0  # where each warmup starts
    end_lr: float = 0.0  # the lr at total_steps and after
    warmup: Length | None = None  # re-warm length: steps (int) or a fraction (float); default 1% (0 for "constant")
    cooldown: Length | None = None  # final decay (wsd, constant, stages): steps or fraction; 20%, 0 for "constant"
    cooldown_shape: CooldownShape | None = None  # the cooldown's curve; default "linear"
    constant_lr: float | None = None  # "infinite": the lr of the constant phase (required)
    decay: Length | None = None  # "infinite": cosine from peak_lr to constant_lr; default 10%
    anneal: Length | None = None  # "infinite": final decay to end_lr; default 10%
    anneal_shape: AnnealShape | None = None  # "infinite": default "linear"
    stage_boundaries: tuple[int, ...] | None = None  # "cycles": first steps of stages 2.. (required)
    stage_peak_lrs: tuple[float, ...] | None = None  # "cycles": one per stage; default peak_lr for all
    stage_kind: StageKind | None = None  # "cycles": default "warmup_cosine"
    count_from_one: bool = True  # step 1 gets the first warmup lr, not init_lr (false: optax's convention)

    def __post_init__(self):
        # Lists from JSON/YAML become tuples so the config stays hashable.
        for name in ("stage_boundaries", "stage_peak_lrs"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        _validate(self)

    @property
    def stage_spans(self) -> tuple[tuple[int, int], ...]:
        """[start, end) of each segment in 0-based update counts (step N is count N - 1): one
        segment for every kind but "cycles"."""
        edges = (0, *(b - 1 for b in self.stage_boundaries or ()), self.total_steps)
        return tuple(zip(edges[:-1], edges[1:]))

    @property
    def stage_peaks(self) -> tuple[float, ...]:
        if self.stage_peak_lrs is not None:
            return tuple(float(x) for x in self.stage_peak_lrs)
        return (float(self.peak_lr),) * len(self.stage_spans)

    def warmup_steps(self, length: int | None = None) -> int:
        """Warmup steps of a segment of `length` steps (default total_steps)."""
        default = 0 if self.kind == "constant" else DEFAULT_WARMUP
        return _steps(self.warmup, default, length or self.total_steps)

    def cooldown_steps(self, length: int | None = None) -> int:
        """Final-decay steps of a wsd/constant segment of `length` steps; 0 for other segments."""
        if self.kind == "constant":
            return _steps(self.cooldown, 0, length or self.total_steps)
        if self.kind == "wsd" or (self.kind == "cycles" and self.stage_kind == "wsd"):
            return _steps(self.cooldown, DEFAULT_COOLDOWN, length or self.total_steps)
        return 0

    @property
    def decay_steps(self) -> int:
        return _steps(self.decay, DEFAULT_DECAY, self.total_steps) if self.kind == "infinite" else 0

    @property
    def anneal_steps(self) -> int:
        return _steps(self.anneal, DEFAULT_ANNEAL, self.total_steps) if self.kind == "infinite" else 0


def make_schedule(config: ScheduleConfig) -> optax.Schedule:
    """The `step -> lr` function of `config`, float32, for Python ints and traced int32 steps."""
    segments = []
    for (start, end), peak in zip(config.stage_spans, config.stage_peaks):
        segments.append(_shift(_segment(config, end - start, peak), 1 if config.count_from_one else 0))
    starts = [start for start, _ in config.stage_spans[1:]]
    # join_schedules hands each later segment `step - boundary`, so every stage counts from its own 0.
    joined = optax.join_schedules(segments, starts) if starts else segments[0]

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        # broadcast: optax's constant schedule returns a scalar even for an array of steps
        return jnp.broadcast_to(jnp.asarray(joined(step), dtype=jnp.float32), jnp.shape(step))

    return schedule


def _segment(config: ScheduleConfig, length: int, peak: float) -> optax.Schedule:
    """The curve c(t) of one segment: c(0) = init_lr, c(warmup) = peak, c(length) = end_lr."""
    init, end = float(config.init_lr), float(config.end_lr)
    warmup = config.warmup_steps(length)
    kind = (config.stage_kind or "warmup_cosine") if config.kind == "cycles" else config.kind
    if kind == "warmup_cosine":
        if warmup == 0:
            return optax.cosine_decay_schedule(peak, length, alpha=end / peak)
        # decay_steps counts from step 0, the warmup included.
        return optax.warmup_cosine_decay_schedule(init, peak, warmup, length, end)
    if kind == "infinite":
        const = float(config.constant_lr)
        anneal_start = length - config.anneal_steps
        return _phases(
            (warmup, optax.linear_schedule(init, peak, warmup)),
            (config.decay_steps, _decay("cosine", peak, const, config.decay_steps)),
            (anneal_start - warmup - config.decay_steps, optax.constant_schedule(const)),
            (config.anneal_steps, _decay(config.anneal_shape or "linear", const, end, config.anneal_steps)),
        )
    cooldown = config.cooldown_steps(length)  # "wsd" and "constant"
    return _phases(
        (warmup, optax.linear_schedule(init, peak, warmup)),
        (length - warmup - cooldown, optax.constant_schedule(peak)),
        (cooldown, _decay(config.cooldown_shape or "linear", peak, end, cooldown)),
    )


def _phases(*phases: tuple[int, optax.Schedule]) -> optax.Schedule:
    """Joins (length, schedule) phases end to end, dropping empty ones; the last one runs on forever
    (each decay holds its end value past its length)."""
    kept = [(n, fn) for n, fn in phases if n > 0] or [phases[-1]]
    boundaries = list(itertools.accumulate(n for n, _ in kept[:-1]))
    return optax.join_schedules([fn for _, fn in kept], boundaries) if boundaries else kept[0][1]


def _decay(shape: str, start: float, end: float, steps: int) -> optax.Schedule:
    """From `start` to `end` over `steps`, then `end`."""
    if steps <= 0:
        return optax.constant_schedule(end)
    if shape == "linear":
        return optax.linear_schedule(start, end, steps)
    if shape == "cosine":
        if start == 0:
            return optax.constant_schedule(end)
        return optax.cosine_decay_schedule(start, steps, alpha=end / start)

    def one_minus_sqrt(step):  # Hägele et al. 2024; optax has no such shape
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
        return end + (start - end) * (1.0 - jnp.sqrt(progress))

    return one_minus_sqrt


def _shift(fn: Callable, offset: int) -> optax.Schedule:
    return fn if offset == 0 else (lambda step: fn(step + offset))


def _steps(value: Length | None, default: Length, length: int) -> int:
    value = default if value is None else value
    if isinstance(value, float):
        return max(1, round(value * length))
    return value


# ---- validation ----------------------------------------------------------------------------------

def _fail(field: str, message: str):
    """Stops with 'schedule.FIELD: MESSAGE', the key as the user wrote it in the config."""
    raise CptjaxError(f"schedule.{field}: {message}")


def _check_lr(name: str, value, *, positive: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        what = "a positive number" if positive else "a number >= 0"
        _fail(name, f"must be {what}, got {value!r}")


def _check_length(name: str, value) -> None:
    """An int is a number of steps, a float a fraction of the segment."""
    if isinstance(value, int) and value < 0:
        _fail(name, f"must be >= 0 steps, got {value}")
    if isinstance(value, float) and not 0.0 < value < 1.0:
        _fail(name, f"a float is a fraction of the steps and must be in (0, 1), got {value!r}; "
              f"give a number of steps as an int")


def _validate(c: ScheduleConfig) -> None:
    if c.total_steps <= 0:
        _fail("total_steps", f"must be positive, got {c.total_steps!r}")
    for name in sorted(_OPTIONAL - _USES[c.kind]):
        if getattr(c, name) is not None:
            users = [k for k in KINDS if name in _USES[k]]
            _fail(name, f"not used by kind {c.kind!r} (only by {', '.join(map(repr, users))}); "
                  f"remove it or change kind")
    _check_lr("peak_lr", c.peak_lr, positive=True)
    _check_lr("init_lr", c.init_lr)
    _check_lr("end_lr", c.end_lr)
    for name in ("warmup", "cooldown", "decay", "anneal"):
        if getattr(c, name) is not None:
            _check_length(name, getattr(c, name))
    if c.kind == "cycles":
        _validate_stages(c)
        for name in ("cooldown", "cooldown_shape"):
            if c.stage_kind != "wsd" and getattr(c, name) is not None:
                _fail(name, "only used by stage_kind 'wsd', and stage_kind is "
                      f"{c.stage_kind or 'warmup_cosine'!r}; remove it or set stage_kind 'wsd'")
    if c.kind == "infinite":
        if c.constant_lr is None:
            _fail("constant_lr", "kind 'infinite' needs it: the lr of its constant phase (e.g. a third "
                  "of peak_lr)")
        _check_lr("constant_lr", c.constant_lr, positive=True)
        if not c.end_lr <= c.constant_lr <= c.peak_lr:
            _fail("constant_lr", f"must lie between end_lr ({c.end_lr}) and peak_lr ({c.peak_lr}), "
                  f"got {c.constant_lr}")

    for (start, end), peak in zip(c.stage_spans, c.stage_peaks):
        where = f"the stage of steps {start + 1}-{end}" if c.kind == "cycles" else "total_steps"
        peak_name = "stage_peak_lrs" if c.stage_peak_lrs is not None else "peak_lr"
        in_stage = f" in {where}" if c.kind == "cycles" else ""
        if c.init_lr > peak:
            _fail("init_lr", f"{c.init_lr} must not exceed {peak_name} ({peak}){in_stage}: a warmup rises")
        if c.end_lr > peak:
            _fail("end_lr", f"{c.end_lr} must not exceed {peak_name} ({peak}){in_stage}: a schedule decays")
        _validate_lengths(c, end - start, where)


def _validate_stages(c: ScheduleConfig) -> None:
    b = c.stage_boundaries
    if not b:
        _fail("stage_boundaries", "kind 'cycles' re-warms at each stage: add data.stages, or give "
              f"the steps where stages 2.. begin (e.g. [1000, 2500]); got {b!r}")
    if any(x <= y for x, y in zip(b[1:], b[:-1])):
        _fail("stage_boundaries", f"must be strictly increasing, got {list(b)}")
    if b[0] < 2 or b[-1] > c.total_steps:
        _fail("stage_boundaries", f"must be first steps of stages 2.., between 2 and total_steps "
              f"({c.total_steps}), got {list(b)}")
    if c.stage_peak_lrs is not None:
        if len(c.stage_peak_lrs) != len(b) + 1:
            _fail("stage_peak_lrs", f"must give one lr per stage ({len(b) + 1} for {len(b)} boundaries), "
                  f"got {c.stage_peak_lrs!r}")
        for i, lr in enumerate(c.stage_peak_lrs):
            _check_lr(f"stage_peak_lrs[{i}]", lr, positive=True)


def _validate_lengths(c: ScheduleConfig, length: int, where: str) -> None:
    """The phases must fit in the segment; warmup_cosine needs at least one step of cosine."""
    warmup, cooldown = c.warmup_steps(length), c.cooldown_steps(length)
    used = {"warmup": warmup, "cooldown": cooldown, "decay": c.decay_steps, "anneal": c.anneal_steps}
    used = {k: v for k, v in used.items() if v}
    total = sum(used.values())
    kind = (c.stage_kind or "warmup_cosine") if c.kind == "cycles" else c.kind
    if kind == "warmup_cosine" and warmup >= length:
        _fail("warmup", f"{warmup} steps must be less than the {length} steps of {where} "
              f"to leave room for the cosine; shorten warmup")
    if total > length:
        parts = " + ".join(f"{k} {v}" for k, v in used.items())
        _fail(next(iter(used)), f"{parts} = {total} steps exceeds the {length} steps of {where}; "
              f"shorten {' or '.join(used)}")

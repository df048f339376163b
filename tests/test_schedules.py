"""Learning-rate schedules: boundary values against the formulas written out here, monotonicity,
jit agreement, config validation, and the SVG plot of every kind."""

import math
import xml.etree.ElementTree as ET

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_helpers import load_script

from cptjax.core.config_tree import from_dict
from cptjax.core.errors import CptjaxError
from cptjax.train.schedules import KINDS, ScheduleConfig, make_schedule

P, INIT, END, T = 1e-4, 1e-5, 1e-6, 1000


def lr(config: ScheduleConfig, step: int) -> float:
    return float(make_schedule(config)(step))


def close(got: float, want: float) -> bool:
    # float32 arithmetic on lrs ~1e-4: a few ulps relative, and an absolute floor for values near 0.
    return math.isclose(got, want, rel_tol=2e-6, abs_tol=1e-12)


def assert_values(config: ScheduleConfig, expected: dict[int, float]) -> None:
    got = {s: lr(config, s) for s in expected}
    bad = {s: (got[s], want) for s, want in expected.items() if not close(got[s], want)}
    assert not bad, f"step: (got, want) {bad}"


def cos_mix(hi: float, lo: float, progress: float) -> float:
    return lo + (hi - lo) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- boundary values ------------------------------------------------------------------------------

def test_warmup_cosine_first_update_is_nonzero_and_last_is_end_lr():
    # Curve c(t): linear INIT -> P over 20 steps, cosine P -> END over the remaining 980; update s
    # gets c(s + 1).
    config = ScheduleConfig(T, P, init_lr=INIT, end_lr=END, warmup=20)
    assert_values(config, {
        0: INIT + (P - INIT) / 20,  # not INIT: the first update moves the weights
        9: INIT + (P - INIT) * 10 / 20,
        19: P,  # end of warmup
        20: cos_mix(P, END, 1 / 980),
        19 + 490: (P + END) / 2,  # cosine midpoint
        T - 1: END,  # the last of T updates
        T: END, 5 * T: END,  # held after
    })


def test_warmup_cosine_default_init_lr_zero_still_moves_on_step_zero():
    assert lr(ScheduleConfig(T, P, warmup=10), 0) == pytest.approx(P / 10, rel=1e-6)


def test_count_from_zero_is_optax_convention():
    config = ScheduleConfig(T, P, init_lr=INIT, end_lr=END, warmup=20, count_from_one=False)
    assert_values(config, {0: INIT, 10: (INIT + P) / 2, 20: P, 20 + 490: (P + END) / 2, T: END, 2 * T: END})


def test_warmup_fraction_is_of_total_steps():
    config = ScheduleConfig(T, P, warmup=0.02)  # 20 steps
    assert config.warmup_steps() == 20
    assert_values(config, {0: P / 20, 18: P * 19 / 20, 19: P, 20: cos_mix(P, 0.0, 1 / 980)})


def test_warmup_cosine_without_warmup_starts_at_peak():
    config = ScheduleConfig(T, P, warmup=0, end_lr=END, count_from_one=False)
    assert_values(config, {0: P, 500: (P + END) / 2, T: END})


@pytest.mark.parametrize("shape,mid", [
    ("linear", (P + END) / 2),
    ("cosine", (P + END) / 2),
    ("1-sqrt", END + (P - END) * (1 - math.sqrt(0.5))),
])
def test_wsd_each_cooldown_shape(shape, mid):
    # Warmup 20, stable up to t = 800, cooldown over the last 200 (20%); update s gets c(s + 1).
    config = ScheduleConfig(T, P, kind="wsd", init_lr=INIT, end_lr=END, warmup=20, cooldown=0.2,
                            cooldown_shape=shape)
    quarter = {"linear": END + (P - END) * 0.75, "cosine": cos_mix(P, END, 0.25),
               "1-sqrt": END + (P - END) * (1 - math.sqrt(0.25))}[shape]
    assert config.cooldown_steps() == 200
    assert_values(config, {
        0: INIT + (P - INIT) / 20, 19: P, 20: P,
        799: P,  # c(800): cooldown starts
        849: quarter, 899: mid,
        T - 1: END, T: END, 3 * T: END,
    })


def test_wsd_default_cooldown_is_twenty_percent_and_linear():
    config = ScheduleConfig(T, P, kind="wsd", warmup=10)
    assert config.cooldown_steps() == 200
    assert_values(config, {799: P, 899: P / 2, T - 1: 0.0})


def test_constant_is_constant_by_default():
    config = ScheduleConfig(T, P, kind="constant")
    assert config.warmup_steps() == 0 and config.cooldown_steps() == 0
    assert_values(config, {0: P, 500: P, T - 1: P, T: P, 10 * T: P})


def test_constant_with_warmup_and_cooldown():
    config = ScheduleConfig(T, P, kind="constant", warmup=10, cooldown=100, end_lr=END,
                            cooldown_shape="1-sqrt")
    assert_values(config, {0: P / 10, 9: P, 899: P, 924: END + (P - END) * 0.5, T - 1: END, T: END})


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_infinite_phases(shape):
    # Warmup 10, cosine P -> C until t = 100, C held until t = 900, anneal C -> END by t = 1000.
    C = 3e-5
    config = ScheduleConfig(T, P, kind="infinite", warmup=10, decay=90, anneal=0.1, constant_lr=C,
                            end_lr=END, anneal_shape=shape)
    anneal_mid = (C + END) / 2  # linear and cosine agree at the midpoint
    anneal_quarter = C - (C - END) * 0.25 if shape == "linear" else cos_mix(C, END, 0.25)
    assert_values(config, {
        0: P / 10, 9: P,
        54: cos_mix(P, C, 45 / 90),
        99: C, 500: C, 899: C,  # constant phase: c(100) .. c(900)
        924: anneal_quarter, 949: anneal_mid,
        T - 1: END, T: END, 2 * T: END,
    })


def test_cycles_rewarm_each_stage_to_its_own_peak():
    # Stages of steps 1-400, 401-700, 701-1000 (update counts [0, 400), [400, 700), [700, 1000));
    # warmup 5% of each stage = 20, 15, 15 steps.
    peaks = (P, P / 2, P / 4)
    config = ScheduleConfig(T, P, kind="cycles", stage_boundaries=(401, 701), stage_peak_lrs=peaks,
                            warmup=0.05, end_lr=END)
    assert [config.warmup_steps(end - start) for start, end in config.stage_spans] == [20, 15, 15]
    assert_values(config, {
        0: peaks[0] / 20, 19: peaks[0], 19 + 190: (peaks[0] + END) / 2, 399: END,
        400: peaks[1] / 15, 414: peaks[1], 414 + 142: cos_mix(peaks[1], END, 142 / 285), 699: END,
        700: peaks[2] / 15, 714: peaks[2], 999: END,
        T: END, 2 * T: END,
    })


def test_cycles_of_wsd_stages():
    config = ScheduleConfig(T, P, kind="cycles", stage_kind="wsd", stage_boundaries=[501], warmup=10,
                            cooldown=0.2)
    assert config.stage_boundaries == (501,)  # a list from JSON becomes a tuple
    # Each stage: 500 steps, warmup 10, cooldown the last 100 (linear to 0).
    assert_values(config, {0: P / 10, 9: P, 399: P, 449: P / 2, 499: 0.0,
                           500: P / 10, 509: P, 899: P, 949: P / 2, 999: 0.0, 1200: 0.0})


# ---- shape and jit --------------------------------------------------------------------------------

EVERY_KIND = {
    "warmup_cosine": ScheduleConfig(T, P, init_lr=INIT, end_lr=END, warmup=30),
    "wsd": ScheduleConfig(T, P, kind="wsd", init_lr=INIT, end_lr=END, warmup=30, cooldown_shape="1-sqrt"),
    "constant": ScheduleConfig(T, P, kind="constant", warmup=30, cooldown=0.1, cooldown_shape="cosine"),
    "infinite": ScheduleConfig(T, P, kind="infinite", warmup=30, constant_lr=3e-5, end_lr=END),
    "cycles": ScheduleConfig(T, P, kind="cycles", stage_boundaries=(301, 601), warmup=30, end_lr=END),
}


def test_every_kind_is_covered():
    assert set(EVERY_KIND) == set(KINDS)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "cycles"])
def test_rises_through_warmup_then_never_rises(kind):
    config = EVERY_KIND[kind]
    lrs = np.asarray(make_schedule(config)(jnp.arange(2 * T)))
    peak_at = config.warmup_steps() - 1  # update warmup-1 gets c(warmup) = peak
    assert lrs[peak_at] == pytest.approx(P, rel=1e-6)
    assert np.all(np.diff(lrs[:peak_at + 1]) > 0)
    # optax's linear_schedule computes (start - end) * 1 + end at its first step, which float32 can
    # round one ulp above start (seen where "infinite" enters its anneal): allow a few ulps.
    assert np.all(np.diff(lrs[peak_at:]) <= 4 * np.spacing(np.float32(P)))


def test_cycles_decay_within_each_stage_and_jump_at_boundaries():
    lrs = np.asarray(make_schedule(EVERY_KIND["cycles"])(jnp.arange(T)))
    for start, end in ((0, 300), (300, 600), (600, 1000)):
        stage = lrs[start:end]
        assert np.all(np.diff(stage[:30]) > 0) and np.all(np.diff(stage[29:]) <= 0)
    assert lrs[300] < lrs[299 - 30] and lrs[300] > lrs[299]  # re-warm starts low, above the end lr


@pytest.mark.parametrize("kind", KINDS)
def test_jit_with_traced_step_matches_python_ints(kind):
    schedule = make_schedule(EVERY_KIND[kind])
    jitted = jax.jit(schedule)
    for step in (0, 1, 29, 30, 299, 300, 301, 550, 899, 999, 1000, 5000):
        traced = jitted(jnp.asarray(step, dtype=jnp.int32))
        assert traced.dtype == jnp.float32
        assert float(traced) == pytest.approx(float(schedule(step)), rel=1e-6, abs=1e-12)


# ---- validation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(peak_lr=-1e-4), "peak_lr"),
    (dict(peak_lr=0.0), "peak_lr"),
    (dict(init_lr=-1e-6), "init_lr"),
    (dict(end_lr=float("nan")), "end_lr"),
    (dict(init_lr=2e-4), "init_lr"),  # above peak
    (dict(end_lr=2e-4), "end_lr"),
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10.0), "total_steps"),
    (dict(kind="cosine"), "kind"),
    (dict(warmup=T), "warmup"),  # no room for the cosine
    (dict(warmup=2 * T), "warmup"),
    (dict(warmup=-1), "warmup"),
    (dict(warmup=1.5), "warmup"),
    (dict(warmup=0.0), "warmup"),
    (dict(warmup=True), "warmup"),
    (dict(kind="wsd", cooldown=1.0), "cooldown"),
    (dict(kind="wsd", warmup=600, cooldown=500), "warmup 600 + cooldown 500 = 1100"),
    (dict(kind="wsd", cooldown_shape="exp"), "cooldown_shape"),
    (dict(cooldown=0.2), "cooldown"),  # warmup_cosine has no cooldown
    (dict(kind="wsd", constant_lr=1e-5), "constant_lr"),
    (dict(kind="infinite"), "constant_lr"),
    (dict(kind="infinite", constant_lr=2e-4), "constant_lr"),
    (dict(kind="infinite", constant_lr=3e-5, anneal_shape="1-sqrt"), "anneal_shape"),
    (dict(kind="infinite", constant_lr=3e-5, decay=0.6, anneal=0.5), "decay"),
    (dict(kind="cycles"), "stage_boundaries"),
    (dict(kind="cycles", stage_boundaries=(500, 300)), "stage_boundaries"),
    (dict(kind="cycles", stage_boundaries=(300, 300)), "stage_boundaries"),
    (dict(kind="cycles", stage_boundaries=(1, 300)), "stage_boundaries"),  # step 1 starts stage 1
    (dict(kind="cycles", stage_boundaries=(300, T + 1)), "stage_boundaries"),
    (dict(kind="cycles", stage_boundaries=(300,), stage_peak_lrs=(P,)), "stage_peak_lrs"),
    (dict(kind="cycles", stage_boundaries=(300,), stage_peak_lrs=(P, -P)), "stage_peak_lrs[1]"),
    (dict(kind="cycles", stage_boundaries=(300,), warmup=300), "warmup"),  # longer than stage 1
    (dict(kind="cycles", stage_boundaries=(300,), stage_kind="infinite"), "stage_kind"),
    (dict(kind="cycles", stage_boundaries=(300,), cooldown=0.2), "cooldown"),  # stages are warmup_cosine
    (dict(stage_boundaries=(300,)), "stage_boundaries"),
])
def test_bad_config_names_the_field(kwargs, field):
    """Read as a config is (config_tree checks the types, the class the values): one line that
    starts with the key."""
    args = dict(total_steps=T, peak_lr=P) | kwargs
    with pytest.raises(CptjaxError) as info:
        from_dict(ScheduleConfig, args, "schedule")
    message = str(info.value)
    assert message.startswith("schedule.") and "\n" not in message, message
    assert field in message, message


def test_bad_value_and_allowed_values_are_in_the_message():
    with pytest.raises(CptjaxError, match=r"^schedule.kind: 'cosine' is not allowed; choose one of "
                                          r"'warmup_cosine' \| 'wsd' \|"):
        from_dict(ScheduleConfig, dict(total_steps=T, peak_lr=P, kind="cosine"), "schedule")
    with pytest.raises(CptjaxError, match=r"^schedule.warmup: a float .* in \(0, 1\), got 1.5; give .* as an int"):
        ScheduleConfig(T, P, warmup=1.5)


# ---- plots ----------------------------------------------------------------------------------------


def test_plot_draws_one_matching_polyline_per_schedule(tmp_path):
    plot = load_script("plot_schedules")
    assert {c.kind for c in plot.EXAMPLES.values()} == set(KINDS)  # every kind is plotted
    configs = dict(plot.EXAMPLES) | {"short": ScheduleConfig(50, P, kind="wsd", warmup=5)}
    out = plot.plot_schedules(configs, tmp_path / "schedules.svg", max_points=201)

    root = ET.parse(out).getroot()
    lines = root.findall(".//{http://www.w3.org/2000/svg}polyline")
    assert [line.get("data-label") for line in lines] == list(configs)
    for line, config in zip(lines, configs.values(), strict=True):
        points = np.array([p.split(",") for p in line.get("points").split()], dtype=np.float64)
        steps, lrs = points[:, 0].astype(int), points[:, 1]
        want_steps = min(config.total_steps + 1, 201)
        assert len(points) == want_steps
        assert steps[0] == 0 and steps[-1] == config.total_steps
        schedule = make_schedule(config)
        for i in np.linspace(0, len(steps) - 1, 9).astype(int):
            assert lrs[i] == pytest.approx(float(schedule(int(steps[i]))), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_an_array_of_steps_gives_an_array_of_lrs(kind):
    """What plots and reports do; optax's constant schedule alone would return one scalar."""
    steps = jnp.arange(7)
    assert make_schedule(EVERY_KIND[kind])(steps).shape == (7,)
    assert make_schedule(ScheduleConfig(T, P, kind="constant"))(steps).shape == (7,)

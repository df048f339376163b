"""Plots learning-rate schedules (lr against step) to an SVG, one line per schedule.

    python scripts/plot_schedules.py --out schedules.svg

With no config given, plots `EXAMPLES`: every schedule kind and cooldown shape of cptjax.train.schedules
on a 1000-step run. The SVG is written by hand (a polyline per schedule) so that plotting needs no
matplotlib; each polyline's points are (step, lr) in data units, mapped to the page by its group's
transform, so a test can read the values back exactly.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import escape

import jax.numpy as jnp
import numpy as np

from cptjax.train.schedules import ScheduleConfig, make_schedule

EXAMPLES: dict[str, ScheduleConfig] = {
    "warmup_cosine": ScheduleConfig(1000, 1e-4, warmup=0.03, end_lr=1e-5),
    "wsd linear": ScheduleConfig(1000, 1e-4, kind="wsd", warmup=0.03, cooldown_shape="linear"),
    "wsd cosine": ScheduleConfig(1000, 1e-4, kind="wsd", warmup=0.03, cooldown_shape="cosine"),
    "wsd 1-sqrt": ScheduleConfig(1000, 1e-4, kind="wsd", warmup=0.03, cooldown_shape="1-sqrt"),
    "constant + cooldown": ScheduleConfig(1000, 8e-5, kind="constant", warmup=20, cooldown=0.1),
    "infinite": ScheduleConfig(1000, 1e-4, kind="infinite", warmup=0.03, constant_lr=4e-5,
                               decay=0.2, anneal=0.1, end_lr=1e-6),
    "cycles": ScheduleConfig(1000, 1e-4, kind="cycles", stage_boundaries=(400, 700),
                             stage_peak_lrs=(1e-4, 6e-5, 4e-5), warmup=0.05, end_lr=5e-6),
}

WIDTH, HEIGHT, MARGIN = 800, 420, 50
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def sample_steps(total_steps: int, max_points: int = 501) -> np.ndarray:
    """Integer steps in [0, total_steps]: all of them, or `max_points` spread evenly."""
    if total_steps + 1 <= max_points:
        return np.arange(total_steps + 1)
    return np.unique(np.linspace(0, total_steps, max_points).round().astype(np.int64))


def plot_schedules(configs: Mapping[str, ScheduleConfig], path: str | Path, max_points: int = 501) -> Path:
    """Writes an SVG with one polyline per config, each sampled at `sample_steps(total_steps)`."""
    curves = {}
    for label, config in configs.items():
        steps = sample_steps(config.total_steps, max_points)
        # Schedules are elementwise, so one call evaluates every sampled step.
        lrs = np.asarray(make_schedule(config)(jnp.asarray(steps, dtype=jnp.int32)), dtype=np.float64)
        curves[label] = (steps, lrs)
    x_max = max(int(s[-1]) for s, _ in curves.values()) or 1
    y_max = max(float(lr.max()) for _, lr in curves.values()) or 1.0
    sx, sy = (WIDTH - 2 * MARGIN) / x_max, (HEIGHT - 2 * MARGIN) / y_max

    lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             f'<path d="M{MARGIN},{MARGIN} V{HEIGHT - MARGIN} H{WIDTH - MARGIN}" '
             f'stroke="black" fill="none"/>',
             f'<text x="{WIDTH / 2}" y="{HEIGHT - 15}" text-anchor="middle">step (0 to {x_max})</text>',
             f'<text x="{MARGIN}" y="{MARGIN - 10}">lr (0 to {y_max:.3g})</text>',
             # Data units: x = step, y = lr; the transform flips y and scales to the plot area.
             f'<g transform="translate({MARGIN},{HEIGHT - MARGIN}) scale({float(sx)!r},{-float(sy)!r})">']
    for i, (label, (steps, lrs)) in enumerate(curves.items()):
        points = " ".join(f"{int(s)},{float(lr)!r}" for s, lr in zip(steps, lrs))
        lines.append(f'<polyline data-label="{escape(label, {chr(34): "&quot;"})}" points="{points}" '
                     f'fill="none" stroke="{COLORS[i % len(COLORS)]}" stroke-width="1.5" '
                     f'vector-effect="non-scaling-stroke"/>')
    lines.append("</g>")
    for i, label in enumerate(curves):
        y = MARGIN + 16 * i
        lines.append(f'<text x="{WIDTH - MARGIN - 150}" y="{y}" fill="{COLORS[i % len(COLORS)]}">'
                     f'{escape(label)}</text>')
    lines.append("</svg>")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="schedules.svg", help="SVG file to write")
    args = parser.parse_args()
    print(plot_schedules(EXAMPLES, args.out))


if __name__ == "__main__":
    main()

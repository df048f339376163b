"""`cptjax merge --alpha 0,0.25,... --eval NAME=SPEC ...`: which merge to keep.

Each alpha's merge (merge.py) is built in host memory from the two models (both are read once and
held on the host: about twice the model's size in RAM) and scored on the held-out sets with the
same eval step and packed batches as `cptjax eval`, so a merge written with `cptjax merge --alpha A`
and evaluated with `cptjax eval` gives the same numbers. Alpha 0 (the base itself) is always
evaluated: it is the reference.

For each alpha: adaptation = the mean drop of the domain sets' loss from the base, forgetting = the
largest rise of a general set's loss over the base (nats/token). The best alpha is the one with the
most adaptation among those whose forgetting stays within `max_forgetting`. The sweep folder holds
sweep.json, sweep.md and sweep.png (loss against alpha, and the trade-off curve).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from cptjax.core.atomic_dir import atomic_output_dir, check_output_dir
from cptjax.core.dtypes import float_dtype
from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike
from cptjax.measure.eval_models import EvalSettings, evaluate_host_params, prepare_eval
from cptjax.measure.merge import METHODS, Method, check_alpha, merge_tensor, open_pair
from cptjax.measure.plots import save_sweep_figure
from cptjax.model.transformer import get_param, set_param
from cptjax.train.evaluation import markdown_table
from cptjax.train.step import build_eval_setup

DEFAULT_MAX_FORGETTING = 0.05  # nats/token


def sweep(base: str, tuned: str, alphas: Sequence[float], settings: EvalSettings, out: PathLike, *,
          method: Method = "linear", max_forgetting: float = DEFAULT_MAX_FORGETTING) -> dict:
    """Evaluates the merge at every alpha; writes and returns the sweep's numbers."""
    for alpha in alphas:
        check_alpha(alpha)
    if method not in METHODS:
        raise CptjaxError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if not max_forgetting >= 0:
        raise CptjaxError(f"--max-forgetting {max_forgetting}: must be >= 0 (nats/token)")
    if len(settings.check()) == len(settings.sets):
        raise CptjaxError("--domain: every eval set is a domain set; add a general set to measure forgetting")
    out = check_output_dir(out)
    with open_pair(base, tuned) as pair:
        data = prepare_eval(settings, (pair.base, pair.tuned), ("--base", "--tuned"))
        setup = build_eval_setup(pair.config, float_dtype(settings.dtype, "--dtype"))
        both = (pair.base.read(), pair.tuned.read())
        results = {}
        for alpha in sorted({0.0, *map(float, alphas)}):
            merged: dict = {}
            for path in pair.paths():
                set_param(merged, path, merge_tensor(get_param(both[0], path), get_param(both[1], path), alpha,
                                                     method, pair.dtype))
            results[alpha] = evaluate_host_params(setup, merged, data, f"the merge at alpha {alpha:g}")
        numbers = summarize_sweep(results, data.domain, max_forgetting, method, str(pair.base.describe()),
                                  str(pair.tuned.describe()))
    numbers.update(seq_len=data.seq_len, batch_size=data.batch_size, dtype=settings.dtype)
    with atomic_output_dir(out) as tmp:
        numbers["figure"] = save_sweep_figure(numbers, tmp)
        (tmp / "sweep.json").write_text(json.dumps(numbers, indent=2) + "\n")
        (tmp / "sweep.md").write_text(sweep_markdown(numbers))
    numbers["out"] = str(out)
    return numbers


def summarize_sweep(results: dict[float, dict], domain: tuple[str, ...], max_forgetting: float,
                    method: str, base: str, tuned: str) -> dict:
    """Adaptation and forgetting of every alpha against alpha 0, and the best alpha."""
    reference = results[0.0]
    sets = list(reference)
    general = [n for n in sets if n not in domain]
    points = []
    for alpha, sums in results.items():
        adaptation = sum(reference[n]["loss"] - sums[n]["loss"] for n in domain) / len(domain)
        forgetting = max(sums[n]["loss"] - reference[n]["loss"] for n in general)
        points.append({"alpha": alpha, "results": sums, "adaptation": adaptation, "forgetting": forgetting,
                       "within_tolerance": forgetting <= max_forgetting})
    allowed = [p for p in points if p["within_tolerance"]]
    best = max(allowed, key=lambda p: (p["adaptation"], p["alpha"])) if allowed else None
    return {"base_model": base, "tuned_model": tuned, "method": method, "sets": sets, "domain": list(domain),
            "max_forgetting": max_forgetting, "base": reference, "points": points,
            "best": None if best is None else {k: best[k] for k in ("alpha", "adaptation", "forgetting")}}


def sweep_markdown(numbers: dict) -> str:
    header = ["alpha", *(f"{n} loss" for n in numbers["sets"]), "adaptation", "forgetting", "within tolerance"]
    rows = [[f"{p['alpha']:g}", *(f"{p['results'][n]['loss']:.4f}" for n in numbers["sets"]),
             f"{p['adaptation']:+.4f}", f"{p['forgetting']:+.4f}", "yes" if p["within_tolerance"] else "no"]
            for p in numbers["points"]]
    best = numbers["best"]
    verdict = (f"**Best alpha: {best['alpha']:g}** (adaptation {best['adaptation']:+.4f}, forgetting "
               f"{best['forgetting']:+.4f} nats/token)" if best else "No alpha stays within the tolerance.")
    return (f"# Merge sweep ({numbers['method']})\n\n- base (alpha 0): `{numbers['base_model']}`\n"
            f"- tuned (alpha 1): `{numbers['tuned_model']}`\n- domain sets (adaptation: mean loss drop from "
            f"the base): {', '.join(numbers['domain'])}; the others measure forgetting (largest loss rise)\n"
            f"- forgetting tolerance: {numbers['max_forgetting']:g} nats/token\n\n{verdict}\n\n"
            + markdown_table(header, rows) + f"\n![sweep]({numbers['figure']})\n")

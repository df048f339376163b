"""`cptjax train` end to end, as users run it: the real CLI in a subprocess, the real Grain pipeline
on real text (Python's own sources and WikiText-2), a real tokenizer."""

import re

import numpy as np
import pytest
from run_helpers import cli as _cli
from run_helpers import records as _records
from run_helpers import restore_arrays as _restore


def _programs(output: str) -> tuple[int, int]:
    """(loaded, compiled) from a `cptjax train` console's compile cache line."""
    [line] = [line for line in output.splitlines() if line.startswith("cptjax train: compile cache ")]
    match = re.search(r": (\d+) programs loaded \(.*\), (\d+) compiled$", line)
    assert match, line
    return int(match.group(1)), int(match.group(2))


@pytest.mark.slow
def test_resume_through_the_cli_and_real_pipeline_is_bit_exact(cpt_config, tmp_path):
    """20 steps, stop, 10 more, stop, 10 more gives the same run as 40 straight: every logged loss,
    every eval, every parameter and the optimizer state, bit for bit (the same program on the same
    machine). The resumed starts load their compiled programs from the run's compile cache, and the
    third start compiles nothing at all."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    own = {"JAX_COMPILATION_CACHE_DIR": ""}  # not the tests' shared cache (conftest): each run's own
    first = _cli("train", "--config", str(cpt_config), "--set", f"run_dir={straight}", env=own)
    paused = _cli("train", "--config", str(cpt_config), "--set", f"run_dir={split}", "--until-step", "20", env=own)
    assert "stopped at step 20" in paused
    resumed = _cli("train", "--config", str(cpt_config), "--set", f"run_dir={split}", "--until-step", "30", env=own)
    assert "resumed from step 20" in resumed and "stopped at step 30" in resumed
    again = _cli("train", "--config", str(cpt_config), "--set", f"run_dir={split}", env=own)
    assert "resumed from step 30" in again and "finished at step 40" in again
    programs = [_programs(out) for out in (first, paused, resumed, again)]
    assert programs[0][0] == programs[1][0] == 0 and programs[0][1] == programs[1][1] > 2  # fresh: all compiled
    # The first resume loads the programs the first start cached (its train step among them: 15 of
    # 16 here) and compiles only what that start did not cache: what it ran before its run folder
    # was ready, or not at all (1 here, a dtype conversion of the restore).
    assert programs[2][0] >= programs[1][1] // 2 and programs[2][1] <= 2
    assert programs[3][1] == 0 and programs[3][0] >= programs[2][0]  # the third start compiles nothing

    def losses(run_dir):
        return [(r["step"], r["loss"], r["source_loss"], r["source_tokens"]) for r in _records(run_dir, "train")]
    assert losses(straight) == losses(split)
    assert [s for s, *_ in losses(split)] == list(range(1, 41))
    evals = lambda d: [(r["step"], r["code"]) for r in _records(d, "eval")]  # noqa: E731
    assert evals(straight) == evals(split) and [s for s, _ in evals(split)] == [0, 20, 40]
    # the run learned: real text, real mixture
    assert evals(split)[-1][1]["loss"] < evals(split)[0][1]["loss"]

    for item in ("params", "opt_state"):
        a, b = (_restore(d / "checkpoints" / "40" / item) for d in (straight, split))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)

"""metrics.jsonl at a restart: a last line a crash cut short is set aside, a damaged line elsewhere
is one error naming the file and line."""

import json

import pytest
from etils import epath

from cptjax.core.errors import CptjaxError
from cptjax.train.metrics import JsonLines


def _log(tmp_path, tail: str = "", middle: str | None = None):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "kind": "train", "loss": 1.0 / s}) for s in (1, 2, 3)]
    if middle is not None:
        lines.insert(1, middle)
    path.write_text("".join(f"{line}\n" for line in lines) + tail)
    return epath.Path(path), lines


def test_a_line_cut_short_by_a_crash_is_set_aside_at_the_restart(tmp_path):
    path, lines = _log(tmp_path, tail='{"step": 4, "kind": "tra')  # SIGKILL in the middle of a write
    log = JsonLines(path, start_step=2)
    log.write({"step": 3, "kind": "train", "loss": 0.5})
    log.close()
    assert path.read_text().splitlines() == [*lines[:2], json.dumps({"step": 3, "kind": "train", "loss": 0.5})]
    assert (tmp_path / "metrics.discarded.jsonl").read_text().splitlines() == [lines[2], '{"step": 4, "kind": "tra']
    assert log.last_step == 3


def test_a_damaged_line_before_the_last_is_one_error_naming_it(tmp_path):
    path, _ = _log(tmp_path, middle="garbage")
    with pytest.raises(CptjaxError, match=r"metrics.jsonl:2: not a metrics record; the log is damaged"):
        JsonLines(path, start_step=2)
    assert path.read_text().count("\n") == 4  # nothing rewritten

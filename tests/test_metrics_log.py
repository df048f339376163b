"""metrics.jsonl at a restart: a last line a crash cut short is set aside, a damaged line elsewhere
is one error naming the file and line. The train record's rates: MFU both ways."""

import json

import numpy as np
import pytest
import tiny_configs
from etils import epath

from cptjax.core.errors import CptjaxError
from cptjax.model.config import read_hf_config_file
from cptjax.train.metrics import JsonLines, attended_length, throughput, training_flops_per_token


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


@pytest.mark.parametrize("name,length", [("llama-3.1-8b", 8192), ("gemma-2-9b", 8192), ("mistral-7b-v0.1", 2048)])
def test_mfu_both_ways_counts_what_a_causal_query_attends(name, length):
    """`mfu` is PaLM's count (every position of the row, or of a window); `mfu_causal` counts the
    positions a query attends under the causal mask, on average (MaxText's count). Checked against
    the mean taken position by position, layer by layer."""
    cfg = read_hf_config_file(tiny_configs.config_file(name))
    # Gemma 2's windows (4096, every other layer) are shorter than its row; Mistral's are not
    assert any(w and w < length for w in cfg.layer_windows) == (name == "gemma-2-9b")
    palm, causal = (training_flops_per_token(cfg, length, c) for c in (False, True))
    per_layer = [np.mean(np.minimum(np.arange(1, length + 1), window or length)) for window in cfg.layer_windows]
    full = [min(length, window or length) for window in cfg.layer_windows]
    attention = 12.0 * cfg.num_heads * cfg.head_dim
    assert palm - causal == pytest.approx(attention * (sum(full) - sum(per_layer)), rel=1e-12)
    assert [attended_length(length, w) for w in cfg.layer_windows] == pytest.approx(per_layer, rel=1e-12)

    rates = throughput(cfg, length, tokens_per_s=4000.0, devices=8, peak=459e12)
    assert rates["tokens_per_s_per_device"] == 500.0
    assert rates["tflops_per_device"] == pytest.approx(500.0 * palm / 1e12, rel=1e-12)
    assert rates["mfu"] == pytest.approx(500.0 * palm / 459e12, rel=1e-12)
    assert rates["mfu_causal"] / rates["mfu"] == pytest.approx(causal / palm, rel=1e-12) and causal < palm
    assert "mfu" not in throughput(cfg, length, 4000.0, 8, peak=None)  # a CPU: no peak, no MFU

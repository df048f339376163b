"""Two processes on one machine (jax.distributed over localhost): each reads only its share,
builds its part of the global batch, and resumes exactly from its own saved state.

The test starts this file twice as a script (`--worker`), one per process, with a timeout.
"""

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import (
    STDLIB,
    assert_batches_equal,
    collect,
    corpus_files,
    reassemble,
    tokenizer_dir,
    wiki_articles,
)

from cptjax.core.errors import CptjaxError
from cptjax.data.config import DataConfig, SourceConfig
from cptjax.data.pipeline import build_train_pipeline
from cptjax.train.distributed import gather_states


def _mixture(wiki: str) -> DataConfig:
    return DataConfig(sources=(
        SourceConfig(name="code", type="text", paths=(str(STDLIB / "json" / "*.py"),), weight=0.9),
        SourceConfig(name="wiki", type="jsonl", paths=(wiki,), weight=0.1)), seed=2)


def _worker(port: int, process_id: int, tokenizer: str, wiki: str, out: str) -> None:
    import jax
    from jax.experimental import multihost_utils

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=120)
    index, count = jax.process_index(), jax.process_count()
    result = {"process_index": index, "process_count": count}

    def build(config):
        return build_train_pipeline(config, tokenizer, seq_len=64, batch_size=20,
                                    process_index=index, process_count=count)

    pipeline = build(_mixture(wiki))
    collect(pipeline, 11)
    state = json.loads(json.dumps(pipeline.get_state()))
    all_states = json.loads(json.dumps(gather_states(state)))  # what process 0 would checkpoint
    assert all_states[index] == state and len(all_states) == 2
    expected = collect(pipeline, 50)
    for saved in (state, all_states):  # its own state, or every process's
        restored = build(_mixture(wiki))
        restored.set_state(saved)
        assert_batches_equal(collect(restored, 50), expected)
        restored.close()
    result["rows"] = int(expected[0]["inputs"].shape[0])
    tokens = np.asarray(list(pipeline.token_counts().values()), dtype=np.int64)
    result["global_tokens"] = multihost_utils.process_allgather(tokens).sum(axis=0).tolist()
    try:
        restored.set_state(dict(state, process_index=1 - index))
    except CptjaxError as err:
        result["wrong_process_error"] = str(err)
    pipeline.close()

    # One epoch of a "stop" source: the documents this process saw.
    epoch = build(DataConfig(sources=(SourceConfig(name="wiki", type="jsonl", paths=(wiki,),
                                                   on_exhaustion="stop"),), seed=2))
    batches = []
    try:
        while True:
            batches.append(next(epoch))
    except CptjaxError as err:
        result["end"] = str(err)
    result["docs"] = reassemble(batches)
    multihost_utils.sync_global_devices("done")
    Path(out).write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_share_the_data_and_resume_exactly(tmp_path):
    tokenizer, wiki = str(tokenizer_dir("llama")), str(corpus_files()["wiki_jsonl"])
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(port), str(i), tokenizer,
                               wiki, str(tmp_path / f"p{i}.json")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert [r["process_index"] for r in results] == [0, 1]
    assert all(r["rows"] == 10 and r["process_count"] == 2 for r in results)
    assert "belongs to process 0, this is process 1" in results[1]["wrong_process_error"]
    assert "belongs to process 1, this is process 0" in results[0]["wrong_process_error"]
    # the epoch ended because the "stop" source ran out, not on another error
    assert all("all of this source's documents have been used" in r["end"] for r in results)
    # the realized mixture over both processes' 61 steps x 20 rows
    global_tokens = np.asarray(results[0]["global_tokens"])
    np.testing.assert_allclose(global_tokens / global_tokens.sum(), [0.9, 0.1], atol=0.01)
    # each process saw a disjoint share of the documents, together all of them exactly once
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tokenizer)
    expected = Counter(tuple((hf(t)["input_ids"] + [hf.eos_token_id])[1:]) for t in wiki_articles())
    shares = [Counter(tuple(d) for d in r["docs"]) for r in results]
    assert not set(shares[0]) & set(shares[1])
    assert shares[0] + shares[1] == expected
    assert abs(sum(shares[0].values()) - sum(shares[1].values())) <= 1


if __name__ == "__main__" and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:7])

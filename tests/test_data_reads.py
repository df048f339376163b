"""How many bytes of a JSONL corpus each process reads: its share of the lines, plus the line index.

A plain JSONL file is scanned for its lines once; the offsets are stored beside it
(`NAME.cptjax-lines`), and every later open reads them instead of the file. Each of N processes
then reads only the lines of its documents (every N-th document, shuffled), each with the byte
before it and its newline (the check that the index still fits the file). So a process reads
    its lines + 2 bytes per line (1 for the first line of the file) + the index (8 bytes per line + a header),
which for N = 2 and 8 is about 1/N of the file. Counted by line_index.bytes_read() and, where Linux
reports it, by the bytes the process's read() calls returned (/proc/self/io rchar): the reads are
unbuffered, so nothing is read ahead.
"""

import os
import sys
from pathlib import Path

import grain
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import shakespeare_speeches, tokenizer_dir, write_jsonl

from cptjax.core.errors import CptjaxError
from cptjax.data import line_index
from cptjax.data.config import DataConfig, InputConfig, SourceConfig
from cptjax.data.pipeline import build_train_pipeline, source_seed
from cptjax.data.read import PROBE_DOCS, open_source


def _rchar() -> tuple[int, int] | None:
    """(bytes this process's read calls have returned, the length of this report, which the next
    report counts as read too), or None where the system keeps no such count (not Linux)."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("rchar:"))), len(text)


def _open(path, store: bool = True) -> object:
    """Opens a JSONL source and, as the training pipeline does once its sources passed their
    checks, stores the line indexes it had to make."""
    source = open_source(InputConfig(name="s", type="jsonl", paths=(str(path),)), "data.sources[0]")
    if store:
        source.store_indexes()
    return source


def _line_bytes(data: bytes, indices) -> int:
    """What reading these lines costs: each line, its newline, and the byte before it (none for line 0)."""
    lines = data.split(b"\n")
    return sum(len(lines[i]) + 1 + (i > 0) for i in indices)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("reads") / "speeches.jsonl", shakespeare_speeches())


def test_the_first_open_scans_and_stores_the_index_later_opens_read_only_it(corpus):
    size, texts = corpus.stat().st_size, list(shakespeare_speeches())
    index = Path(line_index.index_path(str(corpus)))
    index.unlink(missing_ok=True)
    before = line_index.bytes_read()
    first = _open(corpus, store=False)
    assert line_index.bytes_read() - before == size  # the scan
    assert not index.exists()  # nothing written before the pipeline has checked its sources
    first.store_indexes()
    assert index.is_file()
    before = line_index.bytes_read()
    second = _open(corpus)
    assert line_index.bytes_read() - before == index.stat().st_size  # the index, not the file
    assert index.stat().st_size < 8 * (len(texts) + 1) + 200
    order = np.random.default_rng(0).permutation(len(texts))
    assert [first[int(i)] for i in order] == [second[int(i)] for i in order] == [texts[i] for i in order]


@pytest.mark.parametrize("processes", [2, 8])
def test_each_process_reads_its_share_of_the_lines_and_the_index(corpus, processes):
    data, size = corpus.read_bytes(), corpus.stat().st_size
    _open(corpus)  # the index exists from here on
    index_size = Path(line_index.index_path(str(corpus))).stat().st_size
    lines = len(shakespeare_speeches())
    reads = []
    for p in range(processes):
        before = line_index.bytes_read()
        source = _open(corpus)
        assert line_index.bytes_read() - before == index_size
        # the order training reads in: this process's share, shuffled (pipeline.document_stream)
        order = grain.MapDataset.range(lines)[p::processes].shuffle(seed=source_seed(0, "s"))
        share = [int(i) for i in order]
        before, rchar = line_index.bytes_read(), _rchar()
        for i in share:
            source[i]
        read = line_index.bytes_read() - before
        if rchar is not None:  # what the read() calls returned: unbuffered, nothing more
            assert _rchar()[0] - sum(rchar) == read
        assert read == _line_bytes(data, share)
        reads.append(read + index_size)
    # about 1/N each: the lines are 160 bytes on average, so the index adds 5% of the file and
    # the checks 1.2% of a share; the shares differ by the lengths of the speeches in them.
    for read in reads:
        assert read < size / processes * 1.1 + index_size
    assert sum(r - index_size for r in reads) == size + lines - 1  # every line once, + 1 byte before each


def test_the_pipeline_reads_the_index_the_probe_and_its_share(corpus):
    """Two processes through build_train_pipeline, one epoch: the first stores the line index; the
    probe reads the first PROBE_DOCS lines in every process (checks before a run starts), the epoch
    only the process's share."""
    data = corpus.read_bytes()
    Path(line_index.index_path(str(corpus))).unlink(missing_ok=True)
    data_size, lines = len(data), len(shakespeare_speeches())
    config = DataConfig(sources=(SourceConfig(name="s", type="jsonl", paths=(str(corpus),),
                                              on_exhaustion="stop"),), prefetch=0)
    for p in range(2):
        before = line_index.bytes_read()
        pipeline = build_train_pipeline(config, tokenizer_dir("llama"), seq_len=256, batch_size=16,
                                        process_index=p, process_count=2)
        opened = data_size if p == 0 else Path(line_index.index_path(str(corpus))).stat().st_size
        assert line_index.bytes_read() - before == opened + _line_bytes(data, range(PROBE_DOCS))
        before = line_index.bytes_read()
        with pytest.raises(CptjaxError, match="all of this source's documents have been used"):
            while True:
                next(pipeline)
        pipeline.close()
        assert line_index.bytes_read() - before == _line_bytes(data, range(p, lines, 2))


def test_a_changed_file_gets_a_new_index(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    assert len(_open(path)) == 2
    write_jsonl(tmp_path / "a.jsonl", ["one", "two", "three"])
    source = _open(path)
    assert len(source) == 3 and source[2] == "three"


def test_a_file_rewritten_with_the_same_size_and_time_fails_naming_the_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["aaaa", "bb", "cc"])
    stat = path.stat()
    source = _open(path)
    write_jsonl(tmp_path / "a.jsonl", ["aa", "bbbb", "cc"])  # line 2 now starts 2 bytes later
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fresh = _open(path)  # the index looks fresh: same size, same time
    assert fresh[2] == "cc"  # its bounds still fit
    for opened in (source, fresh):
        with pytest.raises(CptjaxError, match=r"a\.jsonl:2: the line is not where the line index says"):
            opened[1]


def test_an_unwritable_data_folder_keeps_the_index_in_the_cache(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "data" / "a.jsonl", ["one", "two"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = line_index._store
    beside = line_index.index_path(str(path))
    monkeypatch.setattr(line_index, "_store", lambda place, key, bounds:
                        place != beside and store(place, key, bounds))
    _open(path)
    assert not Path(beside).exists()
    cached = list((tmp_path / "cache" / "cptjax" / "line-index").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("a.jsonl.cptjax-lines")
    before = line_index.bytes_read()
    assert _open(path)[1] == "two"
    assert line_index.bytes_read() - before == cached[0].stat().st_size + len(path.read_bytes().split(b"\n")[1]) + 2


def test_a_glob_over_the_data_folder_skips_the_indexes(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    write_jsonl(tmp_path / "b.jsonl", ["three"])
    _open(tmp_path / "a.jsonl")
    assert (tmp_path / "a.jsonl.cptjax-lines").is_file()
    source = _open(str(tmp_path / "*"))
    assert [source[i] for i in range(len(source))] == ["one", "two", "three"]


def test_a_source_starts_at_most_one_tokenizer_process_per_core():
    from cptjax.data.read import worker_processes

    cores = len(os.sched_getaffinity(0))
    assert worker_processes(1) == 1
    assert worker_processes(cores) == cores
    assert worker_processes(cores + 7) == cores  # `--workers 8` on a 2-core notebook: 2

"""The benchmarks' raw record (scripts/bench_record.py), and the docs' citations of raw files: what the record
says about the CPU, the tree and the load, that it never writes over a file, and that every raw file the
README and docs/ link to is in the repository."""

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

spec = importlib.util.spec_from_file_location("bench_record", ROOT / "scripts" / "bench_record.py")
bench_record = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_record)

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9454P 48-Core Processor
stepping\t: 1
flags\t\t: fpu sse2 avx2 avx512f avx512bw

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 99
"""
ARM = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes sve
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1
"""


def test_the_cpu_is_named_by_family_and_model_on_x86_and_by_implementer_and_part_on_arm():
    x86 = bench_record.cpu_info(X86)
    assert (x86["vendor"], x86["family"], x86["model"], x86["vector"]) == ("AuthenticAMD", "25", "17", "AVX-512")
    assert "family 25 model 17" in bench_record.cpu_description(x86)  # the first processor's, not the last's
    arm = bench_record.cpu_info(ARM)
    assert (arm["implementer"], arm["part"], arm["vector"]) == ("0x41", "0xd40", "SVE")
    assert "implementer 0x41 part 0xd40" in bench_record.cpu_description(arm)


def test_a_record_holds_the_context_and_is_never_written_over_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_record, "BENCH_DIR", tmp_path)
    record = bench_record.begin("unit", ("no-such-package-xyz",))
    first = bench_record.finish(record, {"value": 1})
    second = bench_record.finish(record, {"value": 2})
    assert first.name == f"unit_{record['started_utc'][:10]}.json"
    assert second.name == f"unit_{record['started_utc'][:10]}_2.json"
    written = json.loads(first.read_text())
    assert written["results"] == {"value": 1} and json.loads(second.read_text())["results"] == {"value": 2}
    assert written["software"]["no-such-package-xyz"] is None and written["software"]["jax"]
    load = written["load_average"]
    assert len(load["before"]) == len(load["after"]) == 3 and load["cores"] >= 1
    assert written["command"].startswith("python ")
    assert written["git"]["commit"] and isinstance(written["git"]["dirty"], bool)
    assert written["machine"]["memory_bytes"] > 0 and written["machine"]["cpu"]


def test_the_dirty_flag_counts_changed_tracked_files_not_untracked_ones(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "tracked.py").write_text("a = 1\n")
    git("add", "tracked.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    monkeypatch.setattr(bench_record, "REPO", tmp_path)
    (tmp_path / "docs-benchmarks-output.json").write_text("{}")  # a benchmark's own output: untracked
    assert bench_record.git_state()["dirty"] is False
    (tmp_path / "tracked.py").write_text("a = 2\n")
    state = bench_record.git_state()
    assert state["dirty"] is True and state["dirty_files"] == ["tracked.py"]


@pytest.mark.parametrize("before, idle", [(0.3, True), (1.3, False)])
def test_the_load_note_calls_a_two_core_machine_idle_only_by_the_load_before(before, idle):
    note = bench_record.load_note({"cores": 2, "before": [before, 1.0, 1.0], "after": [2.5, 2.0, 1.5]})
    assert note.startswith("the machine was idle") is idle


def test_every_raw_file_the_docs_link_to_is_in_the_repository():
    tracked = set(subprocess.run(["git", "-C", str(ROOT), "ls-files", "docs"], capture_output=True, text=True,
                                 check=True).stdout.split())
    cited = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+\.json)\)", doc.read_text()):
            path = (doc.parent / target).resolve().relative_to(ROOT).as_posix()
            cited.append(path)
            assert path in tracked, f"{doc.name} links to {target}, which is not committed"
    assert any(p.startswith("docs/benchmarks/") for p in cited)


def test_every_new_format_raw_file_was_made_on_a_clean_tree_by_a_committed_script():
    for path in sorted((ROOT / "docs" / "benchmarks").glob("*.json")):
        record = json.loads(path.read_text())
        if "benchmark" not in record:  # written before scripts/bench_record.py
            continue
        assert record["git"]["dirty"] is False, f"{path.name}: made with uncommitted changes"
        script = record["command"].split()[1]
        assert (ROOT / script).is_file(), f"{path.name}: {script} is not in the repository"
        assert {"before", "after", "cores"} <= set(record["load_average"]), path.name

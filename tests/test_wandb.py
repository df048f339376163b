"""logging.wandb: what the trainer sends to Weights & Biases, read back from the files W&B itself
wrote (offline runs: the .wandb transaction log, parsed with W&B's own protobuf records), against
metrics.jsonl; a resumed run continues the same W&B run; W&B failing never stops training."""

import hashlib
import json
import shutil
import struct
import sys
import zlib

import pytest
from batches import CountingData, raw_config

from cptjax.core.config_tree import to_dict
from cptjax.io.run_layout import RunPaths
from cptjax.measure.report import write_report
from cptjax.train.config import WandbSection, config_from_dict
from cptjax.train.trainer import run

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

VOCAB = 512
# a train record's wall-clock fields: they differ between any two runs
TIMING = {"step_time_s", "tokens_per_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "mfu_causal"}
W_AND_B_KEYS = {"_step", "_runtime", "_timestamp"}  # W&B's own fields of a history row


@pytest.fixture(autouse=True)
def _wandb_env(monkeypatch, tmp_path):
    """W&B quiet, its settings and caches in tmp_path, nothing inherited from the machine. W&B reads
    the WANDB_* variables once per session (its first wandb.init in the process) and ignores later
    changes: each test starts and ends a session of its own (a `cptjax train` process has one)."""
    import wandb

    wandb.teardown()
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME",
                 "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    yield
    wandb.teardown()


def _train(raw, until_step=None):
    config = config_from_dict(raw)
    data = CountingData(VOCAB, config.training.batch_size, config.training.seq_len)
    evals = {"domain": [CountingData(VOCAB, 4, 32, seed=99).batch(0)]}
    return run(config, until_step=until_step, data=data, eval_sets=evals)


def _read_wandb_log(path):
    """The records of a .wandb file: W&B's LevelDB-style log (a 7-byte file header, 32 KiB blocks
    of chunks with a CRC-32 of type + data, 2-byte length and 1-byte type), each record a
    wandb_internal Record."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the tail of a block too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (crc, length, kind) == (0, 0, 0):
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad checksum at {pos}"
        pending += chunk
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _wandb_runs(run_dir):
    """Every local W&B run the run folder's W&B run id has, in start order: [{"run": RunRecord,
    "rows": [{"step": s, key: value}], "summary": {key: value}}].

    `finish()` returns once W&B's service has handled the run's exit; the service closes the run's
    transaction log later (`inform_finish` only informs it). A `cptjax` process waits for all of it
    at exit; this one goes on, so it ends its W&B session first: teardown returns when the service
    has stopped. (On a loaded CI machine a report's log was once read with no record in it.)"""
    import wandb

    wandb.teardown()
    run_id = json.loads(RunPaths(run_dir).wandb_run.read_text())["id"]
    found = []
    # offline-run-<time>-<id>, with a -1, -2... suffix when two starts fall in the same second
    for path in (run_dir / "logs" / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"):
        info = {"rows": [], "summary": {}}
        for record in _read_wandb_log(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info["run"] = record.run
            elif kind == "history":
                row = {_key(i): json.loads(i.value_json) for i in record.history.item}
                assert row["_step"] == record.history.step.num
                info["rows"].append({"step": record.history.step.num,
                                     **{k: v for k, v in row.items() if k not in W_AND_B_KEYS}})
            elif kind == "summary":
                info["summary"].update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        found.append(info)
    return sorted(found, key=lambda info: info["run"].start_time.ToNanoseconds())


def _flat(values, prefix):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def _rows(records):
    """metrics.jsonl's records as W&B history rows: one per step, every field under its kind."""
    rows = {}
    for record in records:
        fields = {k: v for k, v in record.items() if k not in ("step", "kind")}
        rows.setdefault(record["step"], {"step": record["step"]}).update(_flat(fields, f"{record['kind']}/"))
    return [rows[step] for step in sorted(rows)]


def _timing(key: str) -> bool:
    """A wall-clock field of a W&B row: a train record's timings, or any of a goodput account's."""
    return key.removeprefix("train/") in TIMING or key.startswith("goodput/")


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _raw(tmp_path, **wandb):
    return raw_config(tmp_path / "run", wandb.pop("hf"), training={"steps": 12},
                      checkpoint={"every": 4, "keep_last": 3}, eval={"every": 6},
                      logging={"every": 1, "progress": "lines",
                               "wandb": {"project": "cptjax-tests", "name": "tiny", "tags": ["ci", "tiny"],
                                         "mode": "offline", **wandb}})


@pytest.mark.slow  # three short runs and a report: 48-88 s on a busy 2-core machine (load 4-8)
def test_offline_history_equals_metrics_jsonl_across_resumes_and_the_report_adds_figures(tiny_hf, tmp_path,
                                                                                           capsys):
    raw = _raw(tmp_path, hf=tiny_hf("llama-3.2-1b"))
    run_dir = tmp_path / "run"
    logs = run_dir / "logs"

    # 1. Steps 1-8 (saved at 4 and 8; evaluations at 0 and 6): one W&B run, whose history is metrics.jsonl.
    assert _train(raw, until_step=8).final_step == 8
    [first] = _wandb_runs(run_dir)
    assert first["rows"] == _rows(_jsonl(logs / "metrics.jsonl"))
    assert [r["step"] for r in first["rows"]] == list(range(9))
    assert first["rows"][6]["eval/domain/loss"] > 0 and "train/source_loss/domain" in first["rows"][1]
    wandb_run = first["run"]
    assert (wandb_run.project, wandb_run.display_name, list(wandb_run.tags)) == ("cptjax-tests", "tiny", ["ci", "tiny"])
    config = {i.key: json.loads(i.value_json) for i in wandb_run.config.update if i.key != "_wandb"}
    assert config == json.loads(json.dumps(to_dict(config_from_dict(raw))))  # the resolved config, every key

    # 2. A clean restart (step 8 was saved): the same W&B run id, steps 9-10 appended.
    assert _train(raw, until_step=10).origin.startswith("resumed from step 8")
    runs = _wandb_runs(run_dir)
    assert len(runs) == 2 and runs[1]["run"].run_id == wandb_run.run_id and runs[1]["run"].resume
    assert [r["step"] for r in runs[1]["rows"]] == [9, 10]
    assert runs[0]["rows"] + runs[1]["rows"] == _rows(_jsonl(logs / "metrics.jsonl"))

    # 3. A crash after step 10's records, before its checkpoint landed: the restart from step 8 runs
    # steps 9 and 10 again. metrics.jsonl sets their first records aside and logs the new ones; W&B,
    # which cannot write a step twice, keeps the first ones (equal losses: the resume is exact) and
    # gets steps 11 and 12. Every step is in W&B's history once, in order.
    shutil.rmtree(run_dir / "checkpoints" / "10")
    capsys.readouterr()
    result = _train(raw)
    assert result.origin.startswith("resumed from step 8") and result.final_step == 12
    out = capsys.readouterr()
    assert (out.out + out.err).count("W&B already holds steps up to 10") == 1
    runs = _wandb_runs(run_dir)
    assert len(runs) == 3 and {r["run"].run_id for r in runs} == {wandb_run.run_id}
    history = [row for r in runs for row in r["rows"]]
    assert [r["step"] for r in history] == list(range(13))
    final = _rows(_jsonl(logs / "metrics.jsonl"))
    discarded = _rows(_jsonl(logs / "metrics.discarded.jsonl"))
    assert [r["step"] for r in discarded] == [9, 10]
    assert history[:9] == final[:9] and history[11:] == final[11:]
    assert history[9:11] == discarded
    for logged, again in zip(history[9:11], final[9:11], strict=True):
        assert {k: v for k, v in logged.items() if not _timing(k)} == {k: v for k, v in again.items() if not _timing(k)}

    # 4. The report's figures go to the same W&B run's summary, byte for byte; no history row.
    report = write_report(run_dir)
    assert report.wandb
    runs = _wandb_runs(run_dir)
    assert len(runs) == 4 and runs[3]["run"].run_id == wandb_run.run_id and runs[3]["rows"] == []
    images = {k.removeprefix("report/"): v for k, v in runs[3]["summary"].items() if k.startswith("report/")}
    assert set(images) == set(report.figures) and "heldout_loss" in images
    for name, image in images.items():
        assert image["_type"] == "image-file"
        assert image["sha256"] == hashlib.sha256((report.out / report.figures[name]).read_bytes()).hexdigest()


def test_training_goes_on_when_wandb_is_unreachable(tiny_hf, tmp_path, monkeypatch, capsys):
    hf = tiny_hf("llama-3.2-1b")
    short = dict(training={"steps": 4}, eval={"every": 2}, schedule={"peak_lr": 1e-3, "warmup": 1, "end_lr": 1e-4})
    plain = raw_config(tmp_path / "plain", hf, **short)
    _train(plain)
    # Online, to a server that refuses connections, with a key that looks real: wandb.init fails.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    raw = raw_config(tmp_path / "run", hf, **short, logging={"wandb": {"project": "cptjax-tests", "mode": "online"}})
    capsys.readouterr()
    result = _train(raw)
    assert result.final_step == 4 and result.stopped_early is None
    out = capsys.readouterr()
    text = out.out + out.err
    warnings = [line for line in text.splitlines() if "logging.wandb" in line]
    assert len(warnings) == 1, text[-3000:]
    [warning] = warnings
    assert "W&B did not start" in warning and "training goes on without it" in warning and "wandb login" in warning
    assert not RunPaths(tmp_path / "run").wandb_run.exists()  # no W&B run started: the next start makes one

    def comparable(path):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in _jsonl(path / "logs" / "metrics.jsonl")
                if r["kind"] != "goodput"]  # wall-clock accounts

    assert comparable(tmp_path / "run") == comparable(tmp_path / "plain")
    assert len(comparable(tmp_path / "run")) == 4 + 3  # train records 1-4, evaluations 0, 2, 4


def test_wandb_not_installed_or_failing_mid_run_warns_once(tmp_path, monkeypatch):
    from cptjax.train.wandb_run import WandbRun

    section = WandbSection(project="cptjax-tests", mode="offline")
    paths = RunPaths(tmp_path / "run")
    warnings = []

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    missing = WandbRun(section, paths, {}, logged_up_to=-1, warn=warnings.append, without="training goes on")
    missing.log(1, "train", {"loss": 1.0})
    missing.close()
    assert len(warnings) == 1 and "wandb package is not installed" in warnings[0]
    assert "pip install 'cptjax[wandb]'" in warnings[0] and not missing.active
    monkeypatch.delitem(sys.modules, "wandb")

    warnings.clear()
    failing = WandbRun(section, paths, {"a": 1}, logged_up_to=-1, warn=warnings.append, without="training goes on")
    assert failing.active
    calls = []

    def log(values, step):
        calls.append(step)
        raise ConnectionError("the network went away")

    monkeypatch.setattr(failing._run, "log", log)
    for step in range(1, 4):
        failing.log(step, "train", {"loss": 1.0})
    failing.close()
    assert calls == [1] and len(warnings) == 1
    assert "logging to W&B failed at step 1 (ConnectionError: the network went away)" in warnings[0]


@pytest.mark.parametrize(("wandb", "message"), [
    ({"mode": "offline"}, "logging.wandb.project: required key is missing"),
    ({"project": " "}, "logging.wandb.project: must not be empty"),
    ({"project": "p", "mode": "dryrun"}, "logging.wandb.mode: 'dryrun' is not allowed"),
    ({"project": "p", "tags": ["x" * 65]}, "logging.wandb.tags: 'xxxx"),
    ({"project": "p", "dir": "gs://bucket/w"}, "logging.wandb.dir gs://bucket/w: W&B writes local files"),
])
def test_bad_wandb_keys_name_the_key(tmp_path, wandb, message):
    from cptjax.core.errors import CptjaxError

    raw = raw_config(tmp_path / "run", tmp_path, logging={"wandb": wandb})
    with pytest.raises(CptjaxError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        config_from_dict(raw)


def test_where_wandb_writes_its_mode_and_a_bad_id_file(tmp_path, monkeypatch):
    from etils import epath

    from cptjax.train.wandb_run import WandbRun, kept_run_id, local_dir, resolved_mode

    paths = RunPaths(tmp_path / "run")
    section = WandbSection(project="p", mode="offline")
    assert local_dir(paths, section) == str(tmp_path / "run" / "logs")  # W&B writes logs/wandb/ in it
    assert local_dir(RunPaths(tmp_path / "run"), WandbSection(project="p", dir="/elsewhere")) == "/elsewhere"
    assert local_dir(RunPaths(epath.Path("gs://bucket/run")), section) is None  # W&B's own default
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    assert local_dir(paths, section) is None  # W&B reads WANDB_DIR itself
    monkeypatch.delenv("WANDB_DIR")

    assert resolved_mode(section) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolved_mode(section) == "disabled"
    warnings = []
    disabled = WandbRun(section, paths, {}, logged_up_to=-1, warn=warnings.append, without="goes on")
    assert not disabled.active and not warnings and not paths.wandb_run.exists()  # nothing, not even the id
    monkeypatch.delenv("WANDB_MODE")

    assert kept_run_id(paths) is None
    started = WandbRun(section, paths, {}, logged_up_to=5, warn=warnings.append, without="goes on")
    assert started.active and started.logged_up_to == -1  # a new W&B run: metrics.jsonl's steps are not in it
    started.close()
    first = kept_run_id(paths)
    assert len(first) == 8 and not warnings
    again = WandbRun(section, paths, {}, logged_up_to=5, warn=warnings.append, without="goes on")
    assert again._run.id == first and again.logged_up_to == 5  # kept in the run folder: one W&B run
    again.close()
    paths.wandb_run.write_text("{not json")
    broken = WandbRun(section, paths, {}, logged_up_to=-1, warn=warnings.append, without="training goes on")
    assert not broken.active and len(warnings) == 1
    assert f"{paths.wandb_run} is not the JSON W&B run record cptjax writes; delete it" in warnings[0]

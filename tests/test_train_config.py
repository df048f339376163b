"""Bad configs fail fast, with one line naming the key, before the run folder is touched."""

import time

import jax
import pytest
import yaml
from batches import raw_config

from cptjax.cli import main


def _write(tmp_path, raw):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _hf(tiny_hf):
    return tiny_hf("llama-3.2-1b")


BAD = [
    ("unknown key", lambda r: r["training"].update(stpes=5), "training.stpes: unknown key; did you mean 'steps'?"),
    ("wrong type", lambda r: r["training"].update(batch_size="four"), "training.batch_size: expected an integer"),
    ("bad literal", lambda r: r["model"].update(remat="some"), "model.remat: 'some' is not allowed"),
    ("mesh does not divide", lambda r: r.update(mesh={"data": 3}),
     "mesh: data=3 x fsdp=1 x expert=1 x sequence=1 x tensor=1 = 3 devices, but there are 1"),
    ("batch vs data axes", lambda r: r.setdefault("optimizer", {}).update(grad_accum_steps=3),
     "training.batch_size 4 is not divisible by optimizer.grad_accum_steps 3"),
    ("seq_len too long", lambda r: r["training"].update(seq_len=100_000),
     "training.seq_len 100000 exceeds the model's max_position_embeddings (256)"),
    ("missing model path", lambda r: r["model"].update(init_from="/no/such/model"),
     "model.init_from /no/such/model: no such folder"),
    ("negative weight", lambda r: r["data"]["sources"][1].update(weight=-1), "data.sources[1].weight: must be >= 0"),
    ("schedule", lambda r: r["schedule"].update(warmup=1000), "schedule"),
    ("position buckets", lambda r: r["eval"].update(position_buckets=[16, 8]),
     "eval.position_buckets [16, 8]: give increasing positive token positions"),
    ("probe longer than rows", lambda r: r["eval"].update(retrieval={"lengths": [24, 64]}),
     "eval.retrieval.lengths [64]: longer than the rows (32 tokens); raise training.seq_len"),
    ("probe depth", lambda r: r["eval"].update(retrieval={"lengths": [32], "depths": [0.5, 2]}),
     "eval.retrieval.depths: give one or more depths in [0, 1]"),
    ("no task names", lambda r: r["eval"].update(tasks={"names": []}),
     "eval.tasks.names: give one or more lm-eval task names or task YAML paths"),
    ("task limit", lambda r: r["eval"].update(tasks={"names": ["x.yaml"], "limit": 0}),
     "eval.tasks.limit: must be >= 1, got 0"),
    ("missing task file", lambda r: r["eval"].update(tasks={"names": ["/no/such/task.yaml"]}),
     "eval.tasks.names /no/such/task.yaml: no such task file"),
    ("unknown task", lambda r: r["eval"].update(tasks={"names": ["hellaswag", "hellaswog"]}),
     "eval.tasks.names hellaswog: not an lm-eval task, group or tag name"),
]


@pytest.mark.parametrize("name, edit, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_config_fails_fast_before_writing(name, edit, expected, tiny_hf, tmp_path, capsys):
    raw = raw_config(tmp_path / "run", _hf(tiny_hf))
    edit(raw)
    path = _write(tmp_path, raw)
    capsys.readouterr()
    compiles = []  # "fast": refused before any program is compiled (a timer would flake on a busy machine)
    listener = lambda event, seconds, **_: compiles.append(event) if "backend_compile" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        assert main(["train", "--config", str(path)]) == 2
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cptjax: error: ") and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_set_overrides_and_config_show(tiny_hf, tmp_path, capsys):
    path = _write(tmp_path, raw_config(tmp_path / "run", _hf(tiny_hf)))
    capsys.readouterr()
    assert main(["config", "show", "--config", str(path), "--set", "training.steps=7",
                 "--set", "optimizer.z_loss=1e-4", "--set", "mesh.rules=[[vocab, null]]"]) == 2
    assert "mesh.rules: logical axes" in capsys.readouterr().err  # a partial table is refused
    assert main(["config", "show", "--config", str(path), "--set", "training.steps=7",
                 "--set", "optimizer.z_loss=1e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["training"]["steps"] == 7 and "total_steps" not in shown["schedule"]  # not a key
    assert shown["optimizer"]["z_loss"] == 1e-4 and shown["mesh"]["rules"][0] == ["vocab", "tensor"]
    assert not (tmp_path / "run").exists()


def test_schedule_total_steps_is_not_a_key(tiny_hf, tmp_path, capsys):
    """The schedule's length is training.steps: a config that sets schedule.total_steps is refused
    (also when it equals training.steps); a run's config.yaml written before that still reads."""
    from cptjax.train.config import config_from_dict, dump_yaml, load_run_config
    from cptjax.train.config_reference import reference_markdown

    raw = raw_config(tmp_path / "run", _hf(tiny_hf))
    path = _write(tmp_path, raw)
    capsys.readouterr()
    steps = raw["training"]["steps"]
    assert main(["config", "show", "--config", str(path), "--set", f"schedule.total_steps={steps}"]) == 2
    err = capsys.readouterr().err
    assert f"schedule.total_steps ({steps}): not a key" in err and "set training.steps" in err
    assert "schedule.total_steps" not in reference_markdown()

    old = yaml.safe_load(dump_yaml(config_from_dict(raw)))
    old["schedule"]["total_steps"] = steps  # as earlier versions wrote config.yaml
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    assert load_run_config(tmp_path / "old.yaml").schedule.total_steps == steps


def test_an_unrelated_non_empty_run_dir_is_refused(tiny_hf, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    path = _write(tmp_path, raw_config(tmp_path / "run", _hf(tiny_hf)))
    capsys.readouterr()
    assert main(["train", "--config", str(path)]) == 2
    assert "run_dir" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_batch_not_divisible_by_the_data_axes_on_two_devices(tiny_hf, tmp_path):
    import os
    import subprocess
    import sys

    raw = raw_config(tmp_path / "run", _hf(tiny_hf), training={"batch_size": 3}, mesh={"data": -1})
    path = _write(tmp_path, raw)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cptjax.cli", "train", "--config", str(path)],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, JAX_PLATFORMS="cpu",
                                     XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert time.perf_counter() - started < 30  # includes starting Python and JAX
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "training.batch_size 3 must be divisible by the data-parallel ways" in last
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_a_key_given_twice_is_refused_with_its_line(tmp_path, capsys):
    path = tmp_path / "twice.yaml"
    path.write_text("run_dir: r\nmodel:\n  hf_config: c.json\n  remat: full\n  remat: none\n")
    assert main(["config", "show", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "key 'remat' appears twice" in err and "line 5" in err

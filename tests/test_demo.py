"""The README's first command: the whole CPT job on a real mixture (code domain + English replay)."""

import json

import pytest

from cptjax.cli import main
from cptjax.demo import run_demo


@pytest.mark.slow
def test_cpt_demo_adapts_and_leaves_everything_where_the_readme_says(tmp_path, capsys):
    lines = []
    result = run_demo(tmp_path / "demo", base_steps=40, cpt_steps=24, echo=lines.append)
    before, after = result["before"], result["after"]
    assert before["step"] == 0 and after["step"] == 24
    assert after["code"]["loss"] < before["code"]["loss"] - 0.2  # the domain held-out loss falls
    assert after["english"]["loss"] > 0 and after["code"]["bits_per_byte"] > 0  # forgetting is measured
    assert result["transformers_logit_diff"] < 1e-4

    run = tmp_path / "demo" / "cpt_run"
    assert (run / "config.yaml").is_file()
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert set(train[-1]["source_tokens"]) == {"code", "english_replay"}
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [12, 24]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "demo" / "cpt_hf" / name).is_file(), name
    assert any("adaptation" in line for line in lines) and any("forgetting" in line for line in lines)

    # It ends with the run's report: the table, the curves, and the same prompt before and after.
    report = tmp_path / "demo" / "report"
    assert result["report"] == str(report)
    markdown = (report / "report.md").read_text()
    assert f"| code | domain | {before['code']['loss']:.4f} | {after['code']['loss']:.4f} |" in markdown
    assert (report / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = result["samples"]
    assert set(samples) == {"base model", "after CPT"} and all(samples.values())
    assert all(text in markdown for text in samples.values())
    assert any(line.startswith("   | code | domain |") for line in lines)
    card = (tmp_path / "demo" / "cpt_hf" / "README.md").read_text()  # the export's model card
    assert "continued from" in card and "english_replay" in card

    # `cptjax convert orbax-to-hf` reads a training run's checkpoints at any kept step.
    capsys.readouterr()
    assert main(["convert", "orbax-to-hf", "--ckpt", str(run / "checkpoints"), "--step", "12",
                 "--out", str(tmp_path / "step12"), "--dtype", "float32"]) == 0
    assert "from step 12" in capsys.readouterr().out

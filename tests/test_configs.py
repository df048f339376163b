"""Every file in configs/ loads into a valid config tree, and opens with its own instructions."""

from pathlib import Path

import pytest

from cptjax.core.config_tree import to_dict
from cptjax.train.config import TrainConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_documents_itself(path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    assert config.schedule.total_steps == config.training.steps
    head = path.read_text().splitlines()[:12]
    assert head[0].startswith("# ") and any(f"--config configs/{path.name}" in line for line in head)
    assert any("What to expect" in line for line in head)
    # the resolved tree round-trips through plain data (what `config show` prints)
    from cptjax.train.config import config_from_dict
    assert config_from_dict(to_dict(config)) == config

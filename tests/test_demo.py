"""The README's first command runs the demo; it must keep working."""

from cptjax.demo import run_demo


def test_demo_round_trip(tmp_path):
    lines = []
    result = run_demo(tmp_path / "demo", echo=lines.append)
    assert result["tensors"] == 38
    assert result["cptjax_logit_diff"] == 0.0
    assert result["transformers_logit_diff"] < 1e-4
    assert len(lines) == 6 and "bit-identical" in lines[3]

"""Weight change from the base, per layer and parameter kind, against NumPy on the HF files themselves."""

import re
import shutil

import numpy as np
import pytest
from etils import epath
from matplotlib.image import imread
from safetensors.numpy import load_file, save_file

from cptjax.cli import main
from cptjax.core.errors import CptjaxError
from cptjax.measure.plots import save_weight_change_figure
from cptjax.measure.weight_change import weight_change

HF_KIND = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)?\.?(\w+?)\.(weight|bias)$")


def _perturbed_copy(base, out, seed=0):
    """A copy of an HF folder whose tensors moved by a different amount in every layer."""
    shutil.copytree(base, out)
    tensors = load_file(str(base / "model.safetensors"))
    rng = np.random.default_rng(seed)
    for name, array in tensors.items():
        layer = HF_KIND.match(name)
        scale = 0.01 * (int(layer.group(1)) + 1) if layer else 0.003
        tensors[name] = (array + scale * rng.standard_normal(array.shape)).astype(array.dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _expected(base, tuned) -> dict:
    """{(kind, layer) or name: ||t - b|| / ||b||} from the HF tensors, in float64 (NaN: zero base)."""
    b, t = load_file(str(base / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    out = {}
    for name in b:
        x, y = b[name].astype(np.float64), t[name].astype(np.float64)
        value = np.linalg.norm(y - x) / np.linalg.norm(x) if np.any(x) else np.nan
        layer = HF_KIND.match(name)
        kind = layer.group(2) + ("_bias" if layer and layer.group(3) == "bias" else "") if layer else None
        out[(kind, int(layer.group(1))) if layer else name] = value
    return out


@pytest.fixture(scope="module")
def models(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("weight_change")
    base = tiny_hf("qwen2.5-0.5b")  # q/k/v biases (zero-initialised) and tied embeddings
    tuned_hf = _perturbed_copy(base, root / "tuned_hf")
    assert main(["convert", "hf-to-orbax", "--hf-dir", str(tuned_hf), "--out", str(root / "tuned")]) == 0
    return base, tuned_hf, root / "tuned"


def test_change_per_layer_and_kind_matches_numpy_on_the_hf_tensors(models):
    base, tuned_hf, tuned_ckpt = models
    expected = _expected(base, tuned_hf)
    for tuned in (tuned_hf, tuned_ckpt):  # an HF folder, and the same weights as a cptjax checkpoint
        change = weight_change(str(base), str(tuned))
        found = {(kind, i): v for kind, values in change.layers.items() for i, v in enumerate(values)}
        found["model.embed_tokens.weight"] = change.other["embed_tokens"]
        found["model.norm.weight"] = change.other["norm"]
        assert set(found) == set(expected)
        for key, value in expected.items():
            if np.isnan(value):  # the zero-initialised biases
                assert np.isnan(found[key]), key
            else:
                # Both sum the same float64 squares, in a different order ([N, H, D] here, [N * H, D] in HF).
                assert found[key] == pytest.approx(value, rel=1e-9), key
        assert "lm_head" not in change.other  # tied to the embeddings
        # later layers moved more, as the perturbation was made
        assert np.all(np.diff(change.layers["q_proj"]) > 0)
        assert [row["layer"] for row in change.rows()] == list(range(3))


def test_a_model_against_itself_has_not_moved(models):
    base, _, _ = models
    change = weight_change(str(base), str(base))
    values = [v for vs in change.layers.values() for v in vs] + list(change.other.values())
    assert all(v == 0.0 or np.isnan(v) for v in values) and any(v == 0.0 for v in values)


def test_models_that_do_not_fit_are_refused_with_one_line(models, tiny_hf):
    base, _, _ = models
    with pytest.raises(CptjaxError, match=r"--tuned .*head_dim is 24, but 16 in --base; .* same architecture"):
        weight_change(str(base), str(tiny_hf("llama-3.2-1b")))


def test_weight_change_figure_is_a_picture(models, tmp_path):
    base, tuned_hf, _ = models
    name = save_weight_change_figure(weight_change(str(base), str(tuned_hf)), epath.Path(tmp_path))
    image = imread(tmp_path / name)
    assert image.shape[0] > 200 and image[..., :3].std() > 0.05

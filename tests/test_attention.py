"""The attention kernels against jax.nn.dot_product_attention: cptjax's own XLA attention, and
splash (TPU) and the Pallas GPU flash kernel in Pallas interpret mode on CPU, forward and backward,
on packed documents with GQA and a sliding window; alone, inside the model (layers under scan with
remat), and under shard_map on 8 devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import attention_cases as cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
from batches import packed_batch
from flax import nnx

from cptjax.core.errors import CptjaxError
from cptjax.model.attention import attend, check_kernel, resolve
from cptjax.model.config import ModelConfig
from cptjax.model.transformer import Llama
from cptjax.train.step import StepConfig, loss_and_grads

WORKER = Path(__file__).parent / "attention_worker.py"


@pytest.mark.parametrize("shape_name,kernel", [("qwen2.5", "xla"), ("mistral", "xla"), ("qwen2.5", "splash"),
                                               ("mistral", "splash"), ("qwen2.5", "pallas_gpu")])
def test_kernel_matches_dot_product_attention_forward_and_backward(shape_name, kernel):
    q, k, v, cotangent, seg, window = cases.qkv(shape_name)
    reference = cases.value_and_grads(
        lambda q, k, v: cases.reference(q, k, v, seg, window), q, k, v, cotangent)
    ours = cases.value_and_grads(
        lambda q, k, v: attend(q, k, v, seg, choice=kernel, window=window), q, k, v, cotangent)
    errors = cases.relative_errors(ours, reference)  # out, dq, dk, dv
    assert max(errors) <= cases.TOLERANCE, errors
    if window is not None:  # the window really masks something here: far more than the tolerance
        causal = cases.value_and_grads(
            lambda q, k, v: cases.reference(q, k, v, seg, None), q, k, v, cotangent)
        assert cases.relative_errors(causal[:1], reference[:1])[0] > 100 * cases.TOLERANCE


@pytest.mark.parametrize("window", [None, 200])
def test_xla_query_blocks_skip_only_masked_keys(window):
    # L = 1024: 8 query blocks of 128; with a 200-token window the late blocks start their keys
    # blocks later (768 -> 512), so whole key blocks are skipped, which must change nothing.
    from cptjax.model.attention import query_blocks

    assert query_blocks(1024) == 8 and query_blocks(100) == 1
    rng = np.random.default_rng(1)
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                          for s in ((1, 1024, 4, 16), (1, 1024, 2, 16), (1, 1024, 2, 16), (1, 1024, 4, 16)))
    seg = jnp.asarray(cases.packed_segment_ids(rng, 1, 1024))
    reference = cases.value_and_grads(lambda q, k, v: cases.reference(q, k, v, seg, window), q, k, v, cotangent)
    ours = cases.value_and_grads(lambda q, k, v: attend(q, k, v, seg, choice="xla", window=window),
                                 q, k, v, cotangent)
    assert max(cases.relative_errors(ours, reference)) <= cases.TOLERANCE


@pytest.mark.parametrize("name,kernel", [("mistral-7b-v0.1", "splash"), ("qwen2.5-0.5b", "pallas_gpu"),
                                         ("llama-3.2-1b", "splash")])
def test_model_loss_and_gradients_match_xla_under_scan_and_remat(name, kernel):
    cfg = ModelConfig.from_hf_config(tiny_configs.shrunk_config(name))
    params = nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    rng = np.random.default_rng(0)
    batch = packed_batch([[rng.integers(0, cfg.vocab_size, n) for n in (50, 40, 30)],
                          [rng.integers(0, cfg.vocab_size, 129)]], 128)

    def run(attention):
        graphdef = nnx.graphdef(Llama(cfg, remat="full", attention=attention, rngs=nnx.Rngs(0)))
        loss, grads, _ = loss_and_grads(graphdef, params, batch, StepConfig(num_sources=1))
        return [np.asarray(loss)] + [np.asarray(g) for g in jax.tree.leaves(grads)]

    ours, reference = run(kernel), run("xla")
    for a, b in zip(ours, reference, strict=True):
        assert np.linalg.norm(a - b) <= cases.TOLERANCE * np.linalg.norm(b)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 2, 4)], ids=["data2-fsdp2-tensor2", "fsdp2-tensor4"])
def test_kernels_under_shard_map_on_eight_devices(mesh):
    # tensor 4 > the tiny models' 2 kv heads: kv stays whole and each device slices its group.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(WORKER), *map(str, mesh)], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["devices"] == 8
    assert set(found["kernels"]) == {"qwen2.5/splash", "qwen2.5/pallas_gpu", "mistral/splash"}
    assert set(found["model"]) == {"mistral/splash", "qwen2.5/pallas_gpu", "olmo2/xla"}
    for case, errors in {**found["kernels"], **found["model"]}.items():
        assert max(errors) <= cases.TOLERANCE, (case, errors)


def test_auto_picks_the_kernel_for_the_backend():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert resolve("auto", "tpu", bf16, 8192, None) == "splash"
    assert resolve("auto", "tpu", f32, 8192, 4096) == "splash"
    assert resolve("auto", "tpu", bf16, 1000, None) == "xla"  # not a multiple of 128
    assert resolve("auto", "gpu", bf16, 4096, None) == "pallas_gpu"
    assert resolve("auto", "gpu", bf16, 4096, 4096) == "pallas_gpu"  # the window covers the row
    assert resolve("auto", "gpu", bf16, 8192, 4096) == "cudnn"  # a window pallas_gpu lacks
    assert resolve("auto", "gpu", f32, 4096, None) == "xla"
    assert resolve("auto", "cpu", bf16, 4096, None) == "xla"
    assert resolve("splash", "cpu", bf16, 4096, None) == "splash"  # interpret mode


def test_a_length_or_window_the_kernel_cannot_take_is_refused_in_one_line():
    with pytest.raises(CptjaxError, match=r"^training.seq_len 1000: model.attention 'splash' needs a "
                       r"multiple of 128 \(e.g. 1024\)"):
        check_kernel("splash", "tpu", jnp.bfloat16, 1000, None, "training.seq_len")
    with pytest.raises(CptjaxError, match="'pallas_gpu' has no sliding window"):
        check_kernel("pallas_gpu", "gpu", jnp.bfloat16, 8192, 4096)
    with pytest.raises(CptjaxError, match="'cudnn' needs a GPU"):
        check_kernel("cudnn", "cpu", jnp.bfloat16, 128, None)
    q, k, v, _, seg, _ = cases.qkv("qwen2.5")
    with pytest.raises(CptjaxError, match="needs a multiple of 128"):
        attend(q[:, :200], k[:, :200], v[:, :200], seg[:, :200], choice="splash", window=None)

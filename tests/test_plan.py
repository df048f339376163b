"""`cptjax plan`: the trainer's own step compiled ahead of time for TPU slices from this CPU host
(libtpu, the `tpu` extra, which CI installs), or for the local devices; every shipped TPU config
fits its named target with at least 10% headroom."""

import importlib.util
import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import tiny_configs
import yaml
from batches import raw_config
from doc_commands import documented_tpu_plans

from cptjax.cli import main
from cptjax.core.errors import CptjaxError
from cptjax.train.config import load_config
from cptjax.train.plan import TPU_HBM_GIB, model_config_for, plan, program_key, topology_devices, topology_name

pytestmark = pytest.mark.usefixtures("no_compile_cache")  # TPU programs compiled, never loaded (conftest)
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# The model each shipped config continues from (its init_from is not on this machine).
MODELS = {"llama-3.1-8b-tpu-wsd.yaml": "llama-3.1-8b", "llama-3.2-1b-code.yaml": "llama-3.2-1b",
          "qwen2.5-0.5b-two-stage.yaml": "qwen2.5-0.5b", "llama-3.1-8b-8xh100.yaml": "llama-3.1-8b",
          "llama-3.1-8b-tpu-v6e-64.yaml": "llama-3.1-8b", "mistral-7b-tpu-v5p-64.yaml": "mistral-7b-v0.1",
          "qwen2.5-0.5b-cpu.yaml": "qwen2.5-0.5b", "llama-3.1-8b-128k-v5p.yaml": "llama-3.1-8b",
          "gemma-2-9b-tpu-v5p-64.yaml": "gemma-2-9b", "mixtral-8x7b-tpu-v5p-256.yaml": "mixtral-8x7b-v0.1",
          "qwen3-30b-a3b-tpu-v5p-128.yaml": "qwen3-30b-a3b"}
# GPU configs cannot be compiled for a GPU here. Their stand-in: the same step compiled for as many
# TPU v5p chips (95.74 GiB each, so the compile does not stop short), whose peak must leave 10% of
# an 80 GB H100 as JAX uses it: 81,559 MiB (nvidia-smi) x XLA_PYTHON_CLIENT_MEM_FRACTION 0.95, which
# scripts/slurm_train.sbatch sets. A proxy (GPU kernels and fusions differ); on the GPU, `cptjax plan`.
H100_GIB = 81_559 / 1024 * 0.95
GPU_PROXY = {1: "v5p-8", 8: "v5p-16"}  # GPUs -> a slice with at least that many chips
# A CPU config must fit the RAM its header names (16 GB) with 10% to spare.
CPU_RAM_GIB = 16e9 / 2**30
HEADROOM = 0.10
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: pip install -e '.[tpu]' "
                                         "(the test extra brings it on x86-64 Linux)")


def hardware(path: Path) -> str:
    """The target named in a config's header: '# Hardware: TPU v5p-128 (...)' -> 'TPU v5p-128 (...)'."""
    lines = [line for line in path.read_text().splitlines()[:20] if line.startswith("# Hardware: ")]
    assert len(lines) == 1, f"{path.name}: its header must name its target hardware once"
    return lines[0].removeprefix("# Hardware: ")


def gpu_count(path: Path) -> int | None:
    """'NVIDIA 8 x H100 80GB' -> 8, 'one NVIDIA GPU with 80 GB' -> 1; None for other hardware."""
    match = re.match(r"(?:one NVIDIA|NVIDIA (\d+) x)", hardware(path))
    return None if not match else int(match.group(1) or 1)


def tpu_target(path: Path) -> str | None:
    match = re.match(r"TPU (v\w+-\d+)\b", hardware(path))
    return match.group(1) if match else None


def hf_config(path: Path) -> str:
    return str(tiny_configs.config_file(MODELS[path.name]))


def recorded_programs() -> dict[str, dict]:
    """The compiler's figures for every program scripts/bench_plan.py compiled, by program_key, from
    the committed records. The same key is the same lowered step for the same devices through the
    same jax, jaxlib and libtpu, so the compiler would answer the same; the plans below compile
    whatever the records do not cover (a changed model or step, another libtpu)."""
    memo = {}
    for path in sorted((ROOT / "docs" / "benchmarks").glob("plan*.json")):
        memo.update(json.loads(path.read_text())["results"].get("programs", {}))
    return memo


def plan_shipped(path: Path, topology: str, device_count: int | None = None):
    config = load_config(path)
    result = plan(config, model_config_for(config, hf_config(path)), topology, device_count=device_count,
                  memo=recorded_programs())
    if not result.recorded:
        warnings.warn(f"{path.name}: its step on {topology} is not in docs/benchmarks/plan*.json, so it "
                      "was compiled (minutes); record it again: python scripts/bench_plan.py --only configs",
                      stacklevel=2)
    return result


def test_every_config_names_its_hardware_and_the_tpu_ones_are_planned():
    assert set(MODELS) == {p.name for p in CONFIGS}
    assert any(tpu_target(p) for p in CONFIGS)
    for path in CONFIGS:
        assert hardware(path).startswith(("TPU ", "one NVIDIA", "NVIDIA", "CPU")), path.name
        assert tpu_target(path) or gpu_count(path) or hardware(path).startswith("CPU"), path.name


def test_slice_names_map_to_the_standard_topologies():
    assert topology_name("v5p-128") == "v5p:4x4x4"  # 128 TensorCores, 64 chips
    assert topology_name("v5p-8") == "v5p:2x2x1"
    assert topology_name("v5p-256") == "v5p:4x4x8"
    assert topology_name("v5e-256") == "v5e:16x16"
    assert topology_name("v5litepod-8") == "v5e:2x4"
    assert topology_name("v6e-64") == "v6e:8x8"
    assert topology_name("v6e-8") == "v6e:2x4"
    assert topology_name("v5p:2x4x4") == "v5p:2x4x4"
    with pytest.raises(CptjaxError, match="--topology v5p-100: cptjax knows slices of 4, 8, 16"):
        topology_name("v5p-100")
    with pytest.raises(CptjaxError, match="expected a TPU slice such as v5p-128"):
        topology_name("h100-8")


@needs_libtpu
@pytest.mark.parametrize("name,chips", [("v5p-128", 64), ("v5p-16", 8), ("v5e-256", 256), ("v6e-64", 64),
                                        ("v6e-8", 8)])
def test_libtpu_builds_the_slice_with_one_device_per_chip(name, chips):
    assert len(topology_devices(name)) == chips


@needs_libtpu
@pytest.mark.parametrize("slice_name", ["v5p-8", "v5e-4", "v6e-4"])
def test_the_hbm_table_is_what_the_tpu_compiler_enforces(slice_name):
    device = topology_devices(slice_name)[0]
    mesh = jax.sharding.Mesh([device], ("x",))
    big = jax.ShapeDtypeStruct((2**36,), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, jax.P()))
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED") as err:
        jax.jit(lambda x: jnp.cumsum(x * 2)).lower(big).compile()  # 256 GiB in and out: too much
    available = re.search(r"available HBM \(([\d.]+)G\)", str(err.value)).group(1)
    assert float(available) == TPU_HBM_GIB[device.device_kind]


# The TPU configs whose `cptjax plan --topology` command the README shows: test_readme runs that
# command as written and checks the same attention kernel and headroom (one compile of about a
# minute each, not two).
README_PLANNED = documented_tpu_plans()


def test_each_documented_tpu_plan_is_its_configs_own_target_and_model():
    assert README_PLANNED  # the README shows at least one
    for name, (topology, model_folder) in README_PLANNED.items():
        path = ROOT / "configs" / name
        assert topology == tpu_target(path), (name, topology)
        # test_readme puts the model's published config.json in that folder
        assert model_folder.lower() == MODELS[name], (name, model_folder)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in CONFIGS if tpu_target(p) and p.name not in README_PLANNED],
                         ids=lambda p: p.name)
def test_every_tpu_config_fits_its_target_with_headroom(path):
    result = plan_shipped(path, tpu_target(path))
    assert result.attention == "splash" and result.memory is not None
    assert result.fits and result.headroom >= HEADROOM, (result.needed, result.device_memory)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in CONFIGS if gpu_count(p)], ids=lambda p: p.name)
def test_every_gpu_config_fits_an_h100_by_the_tpu_compilers_count(path):
    count = gpu_count(path)
    result = plan_shipped(path, GPU_PROXY[count], device_count=count)
    assert result.devices == count and result.memory is not None, result.error
    assert result.needed <= (1 - HEADROOM) * H100_GIB * 2**30, (result.needed / 2**30, H100_GIB)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in CONFIGS if hardware(p).startswith("CPU")], ids=lambda p: p.name)
def test_every_cpu_config_fits_16_gb_of_ram(path):
    config = load_config(path)
    result = plan(config, model_config_for(config, hf_config(path)), device_count=1)
    assert result.memory is not None and result.attention == "xla", result.error
    assert "16 GB of RAM" in hardware(path)
    assert result.needed <= (1 - HEADROOM) * CPU_RAM_GIB * 2**30, result.needed / 2**30


@needs_libtpu
def test_a_step_that_does_not_fit_fails_as_the_chip_would_and_names_the_knobs(capsys):
    # The flagship with every memory knob off: XLA attention, whole [B, L, V] float32 logits and no
    # remat (every layer's activations kept). XLA attention alone now fits (58.72 GiB,
    # docs/benchmarks/plan_2026-12-07.json): it keeps no [B, N, L, S] scores between forward and backward.
    path = ROOT / "configs/llama-3.1-8b-tpu-wsd.yaml"
    code = main(["plan", "--config", str(path), "--topology", "v5p-128", "--hf-config", hf_config(path),
                 "--set", "model.attention=xla", "--set", "model.loss_chunk=null", "--set", "model.remat=none"])
    out = capsys.readouterr().out
    assert code == 1
    assert "RESOURCE_EXHAUSTED: Ran out of memory on HBM" in out and "does NOT fit" in out
    assert "- model.attention: auto" in out and "- model.loss_chunk: 256" in out and "- model.remat: full" in out


def tiny_plan_config(tmp_path, stages=(), **training):
    """A tiny Qwen2-shaped model's config (float32, loss chunks of 16) in tmp_path, and its config.json."""
    hf = tmp_path / "config.json"
    hf.write_text(json.dumps(tiny_configs.shrunk_config("qwen2.5-0.5b")))
    raw = raw_config(tmp_path / "run", hf, training={"steps": 10, "batch_size": 4, "seq_len": 64, **training})
    raw["model"] = {"hf_config": str(hf), "compute_dtype": "float32", "loss_chunk": 16}
    raw["data"]["stages"] = list(stages)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, hf


@needs_libtpu
def test_a_tpu_program_planned_before_is_taken_from_the_memo_and_any_change_compiles(tmp_path):
    path, hf = tiny_plan_config(tmp_path, seq_len=128)
    config = load_config(path)
    model_config = model_config_for(config, str(hf))
    memo = {}
    first = plan(config, model_config, "v5p-8", memo=memo)
    assert not first.recorded and list(memo) == [first.program_key]
    assert first.memory == memo[first.program_key]["memory"]
    again = plan(config, model_config, "v5p-8", memo=memo)
    assert again.recorded and again.program_key == first.program_key
    assert (again.needed, again.memory, again.fits) == (first.needed, first.memory, first.fits)
    # the answer comes from the memo, not a compile: a figure changed there is what the plan reports
    memo[first.program_key] = {**memo[first.program_key], "memory": {**first.memory, "peak": first.needed * 2}}
    assert plan(config, model_config, "v5p-8", memo=memo).needed == first.needed * 2
    # another shape, another slice, or another remat is another program, compiled and added
    for overrides, topology in ((["training.seq_len=256"], "v5p-8"), ([], "v5e-4"), (["model.remat=full"], "v5p-8")):
        other = load_config(path, overrides)
        result = plan(other, model_config_for(other, str(hf)), topology, memo=memo)
        assert not result.recorded and result.program_key in memo, (overrides, topology)
    assert len(memo) == 4
    # a CPU plan compiles every time: the code XLA generates depends on the host's CPU
    assert not plan(config, model_config, memo=memo).recorded and len(memo) == 4


def test_the_program_key_covers_the_compilers_flags_but_not_the_simulated_cpu_count(monkeypatch):
    lowered = jax.jit(lambda x: x * 2).lower(jnp.ones(3))
    devices = jax.devices()[:1]
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
    key = program_key(lowered, devices)
    assert program_key(jax.jit(lambda x: x * 2).lower(jnp.ones(3)), devices) == key  # traced again
    assert program_key(jax.jit(lambda x: x * 3).lower(jnp.ones(3)), devices) != key
    assert program_key(jax.jit(lambda x: x * 2).lower(jnp.ones(4)), devices) != key
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert program_key(lowered, devices) == key
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x")
    assert program_key(lowered, devices) != key
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_enable_latency_hiding_scheduler=false")
    assert program_key(lowered, devices) != key


def test_plan_for_the_local_devices(tmp_path, capsys):
    path, _ = tiny_plan_config(tmp_path, stages=[{"start_step": 5, "seq_len": 128}])  # each shape compiled
    assert main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"on local: {jax.device_count()} x cpu" in out and "attention xla" in out
    assert "batch 4 x 128 (data.stages[0].seq_len (step 5 on): the stage needing the most memory)" in out
    assert re.search(r"fits: [\d.]+ GiB of [\d.]+ GiB per device, \d+% headroom", out)
    assert not (tmp_path / "run").exists()  # plans touch nothing


def test_a_remote_init_from_needs_hf_config(capsys):
    assert main(["plan", "--config", str(ROOT / "configs/llama-3.1-8b-tpu-wsd.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.init_from gs://" in err and "pass --hf-config" in err

"""scripts/bench_train.py's side-by-side with EasyDeL, without EasyDeL: the worker gets every field of the
shape's config.json and the same optimizer, both workers' result lines are read back, and a pair of
processes is summarised as the docs quote it (scripts/easydel_step.py runs only in EasyDeL's environment;
these check what it is given and what comes back)."""

import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_train  # noqa: E402
import easydel_step  # noqa: E402  (imports EasyDeL only inside main)
from step_timing import timed_with_usage, worker_result  # noqa: E402


@pytest.mark.parametrize("shape", list(bench_train.SHAPES))
def test_the_easydel_worker_builds_every_field_of_the_shapes_config_in_float32(shape):
    hf = bench_train.hf_config(shape)
    family, kwargs = easydel_step.model_kwargs(hf)
    assert family == hf["model_type"]
    model_fields = {k: v for k, v in hf.items() if k not in ("architectures", "model_type")}
    assert {k: kwargs.get(k) for k in model_fields} == model_fields  # a field added to hf_config is not dropped
    assert (kwargs["attn_dtype"], kwargs["attn_softmax_dtype"]) == ("float32", "float32")


def test_the_sliding_window_shape_is_mistral_with_gqa_8_to_1_and_llama_refuses_a_window():
    hf = bench_train.hf_config("32m-swa")
    assert (hf["model_type"], hf["sliding_window"], hf["num_attention_heads"] // hf["num_key_value_heads"]) == \
        ("mistral", 128, 8)
    assert bench_train.SHAPES["32m-swa"][2] > hf["sliding_window"]  # the window masks something
    with pytest.raises(SystemExit, match="sliding window"):
        easydel_step.model_kwargs({**hf, "model_type": "llama"})


def test_the_easydel_worker_gets_the_same_optimizer_and_batch_as_cptjax(tmp_path):
    spec = bench_train.worker_spec("7m", warmup=1, steps=2)
    arguments = easydel_step.training_arguments(spec, str(tmp_path))
    opt = bench_train.OPTIMIZER
    assert (arguments["learning_rate"], arguments["weight_decay"], arguments["clip_grad"]) == \
        (bench_train.LR, opt["weight_decay"], opt["grad_clip_norm"])
    assert arguments["extra_optimizer_kwargs"] == {"b1": opt["b1"], "b2": opt["b2"], "eps": opt["eps"]}
    assert (arguments["scheduler"], arguments["total_batch_size"], arguments["max_length"]) == ("none", 16, 256)
    assert spec["tokens"] == bench_train.tokens(16, 256).tolist()  # the rows cptjax's step trains on


def test_a_workers_result_line_is_found_among_its_libraries_output_and_a_failure_names_the_command():
    times, usage = timed_with_usage(lambda: sum(range(1000)), 3)
    assert len(times) == 3 and set(usage) >= {"user_s", "system_s", "minor_faults", "involuntary_switches"}
    line = worker_result([0.5, 0.25], usage, 1.5, 8.9)
    code = f"print('a library logs'); print({line!r}); print('and more')"
    result = bench_train.run_worker([sys.executable, "-c", code], {"shape": "7m"})
    assert (result["step_s"], result["compile_s"], result["last_loss"]) == ([0.5, 0.25], 1.5, 8.9)
    assert result["process_wall_s"] > 0 and "load_1min_before" in result
    with pytest.raises(SystemExit, match="exit 3"):
        bench_train.run_worker([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], {})


def test_pairs_of_processes_are_summarised_by_their_medians_ratios_spread_and_cpu_use():
    facts = {"rows": 2, "length": 4, "model_flops_per_step": 1e9}

    def run(steps, cpu_s, switches):
        return {"step_s": steps, "usage": {"user_s": cpu_s - 0.5, "system_s": 0.5, "involuntary_switches": switches}}
    processes = {"cptjax": [run([1.0, 1.0, 9.0], 11.0, 30), run([1.4, 1.5, 1.4], 6.0, 300)],
                 "easydel": [run([2.0, 2.2, 2.0], 6.2, 3), run([2.1, 2.1, 2.1], 6.3, 3)]}
    summary = bench_train.summarize_processes(processes, facts, {"xla_gflops": 10.0})
    cptjax = summary["cptjax"]
    assert cptjax["process_medians_s"] == [1.0, 1.4]  # a slow step does not move a process's median
    assert cptjax["process_spread"] == pytest.approx(0.4)
    assert cptjax["process_cpu_s_per_step"] == pytest.approx([11.0 / 3, 2.0])
    assert cptjax["process_cores_busy"] == pytest.approx([1.0, 6.0 / 4.3])
    assert cptjax["process_involuntary_switches_per_step"] == [10, 100]
    assert summary["pair_ratios"] == pytest.approx([2.0, 2.1 / 1.4])
    assert summary["speedup_over_easydel"] == pytest.approx(2.05 / 1.2)


def test_cptjax_env_pairs_cptjax_with_itself_under_the_variables():
    assert bench_train.parse_env("LD_PRELOAD=/x.so MALLOC_CONF=a:1,b:2") == \
        {"LD_PRELOAD": "/x.so", "MALLOC_CONF": "a:1,b:2"}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        bench_train.parse_env("LD_PRELOAD")
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--baseline", "easydel", "--cptjax-env", "A=1"])


def test_unknown_shapes_and_depth_beside_easydel_are_refused():
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--shapes", "7m,70b"])
    with pytest.raises(SystemExit):
        bench_train.parse_args(["--baseline", "easydel", "--depth"])
    assert bench_train.parse_args(["--baseline", "easydel", "--shapes", "32m-swa"]).pairs == 5

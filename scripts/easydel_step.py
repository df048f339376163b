"""EasyDeL's Llama (or Mistral) train step, built and timed in EasyDeL's own environment.

    <venv>/bin/python scripts/easydel_step.py < spec.json

The worker of `scripts/bench_train.py --baseline easydel`, which makes the environment and the spec
(bench_train.worker_spec: an HF config.json, the batch's tokens, AdamW's settings, warm-up and timed
steps). It builds the model EasyDeL's way from the same config fields (float32 parameters, compute and
attention), its `Trainer` with AdamW of the same learning rate, betas, eps, weight decay and
global-norm clipping, and times the trainer's own compiled step, `sharded_training_step_function`
(easydel/trainers/trainer/trainer.py: `ejit(training_step, donate_argnums=(0,), ...)`) called as the
trainer's loop calls it (under its mesh, each call waited for with `jax.block_until_ready`), timed by
scripts/step_timing.py as cptjax's worker is. It imports nothing of cptjax: it runs with EasyDeL's pinned jax and flax.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

from step_timing import timed_with_usage, worker_result

# The config.json fields the models read; EasyDeL's own fields come from `easydel_settings`.
HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
             "hidden_act", "bos_token_id", "eos_token_id", "sliding_window")


def model_kwargs(hf: dict) -> tuple[str, dict]:
    """(EasyDeL's model family, its config's keyword arguments) for an HF config.json: the model's own
    fields, and float32 attention (EasyDeL's default `attn_dtype` is bfloat16) with its default
    attention kernel ("vanilla") on one device."""
    family = hf["model_type"]
    if family not in ("llama", "mistral"):
        raise SystemExit(f"easydel_step: model_type {family!r}: this worker builds llama and mistral")
    fields = {k: hf[k] for k in HF_FIELDS if k in hf}
    if family == "llama" and fields.get("sliding_window"):
        raise SystemExit("easydel_step: EasyDeL's Llama has no sliding window; give model_type mistral")
    return family, {**fields, "attn_dtype": "float32", "attn_softmax_dtype": "float32",
                    "sharding_axis_dims": (1, 1, 1, 1, 1)}


def training_arguments(spec: dict, folder: str) -> dict:
    """EasyDeL TrainingArguments for the spec's AdamW: eformer's chain is clip_by_global_norm, then
    optax.adamw(lr, b1, b2, eps, weight_decay=0), then decoupled weight decay lr x weight_decay (on every
    parameter: EasyDeL passes no mask, so norm scales decay too); constant learning rate."""
    opt = spec["optimizer"]
    return {"save_directory": folder, "learning_rate": spec["learning_rate"], "optimizer": "adamw", "scheduler": "none",
            "weight_decay": opt["weight_decay"], "clip_grad": opt["grad_clip_norm"],
            "extra_optimizer_kwargs": {"b1": opt["b1"], "b2": opt["b2"], "eps": opt["eps"]},
            "total_batch_size": spec["rows"], "max_length": spec["length"], "max_training_steps": 1000,
            "use_wandb": False, "report_metrics": False, "do_last_save": False, "save_steps": None,
            "log_steps": 10**9, "progress_bar_type": "json", "model_name": "bench"}


def main() -> None:
    spec = json.loads(sys.stdin.read())
    import easydel as ed
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    family, kwargs = model_kwargs(spec["hf_config"])
    config_cls, model_cls = {"llama": (ed.LlamaConfig, ed.LlamaForCausalLM),
                             "mistral": (ed.MistralConfig, ed.MistralForCausalLM)}[family]
    model = model_cls(config=config_cls(**kwargs), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    ids = np.asarray(spec["tokens"], np.int32)[:, :spec["length"]]  # EasyDeL's loss shifts labels itself
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
    with tempfile.TemporaryDirectory() as folder:
        arguments = ed.TrainingArguments(**training_arguments(spec, folder))
        trainer = ed.Trainer(arguments=arguments, model=model, dataset_train=[dict(zip(batch, row)) for row in
                                                                               zip(*batch.values())])
        step_fn, state = trainer.sharded_training_step_function, trainer.model_state
        extra = (*trainer._train_shared_fn_extra_args, *trainer._train_shared_fn_static_args)
        batch = {k: jnp.asarray(v) for k, v in batch.items()}

        def step():
            nonlocal state
            state, metrics = jax.block_until_ready(step_fn(state, batch, *extra))
            return float(metrics.loss)

        with trainer.mesh:  # as the trainer's loop calls it (Trainer.train: `with self.mesh:`)
            start = time.perf_counter()
            loss = step()
            compile_s = time.perf_counter() - start  # the first call compiles
            for _ in range(spec["warmup"]):
                step()
            times, usage = timed_with_usage(step, spec["steps"])
            loss = step()
    print(worker_result(times, usage, compile_s, loss), flush=True)


if __name__ == "__main__":
    main()

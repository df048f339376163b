# The environment for cptjax on NVIDIA GPUs, sourced by scripts/slurm_train.sbatch (or by hand:
# `source scripts/gpu_env.sh` before `cptjax train` on one node). Every XLA flag below exists in
# the jax 0.10-0.11 builds: tests/test_launchers.py starts JAX with this XLA_FLAGS, and XLA refuses
# a flag it does not know. Sources: JAX's "GPU performance tips" page and MaxText's GPU settings.
# A value set before sourcing wins (e.g. XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 sbatch ...).

# JAX preallocates 75% of each GPU by default; cptjax plan's GPU figures assume 95%.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"

_cptjax_gpu_flags=(
  # Schedule collectives to overlap with compute (the fsdp all-gathers and reduce-scatters).
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Pipeline fsdp's collectives across the scanned layers: layer i+1's all-gather during layer i.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # Double-buffer the scan over layers, so the pipelined collectives have a buffer to fill.
  --xla_gpu_enable_while_loop_double_buffering=true
  # Combine small collectives into large ones (bytes): fewer NCCL launches per step.
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  # No CUDA graphs: they pin memory and can slow steps whose shapes repeat rarely.
  --xla_gpu_enable_command_buffer=
)
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }${_cptjax_gpu_flags[*]}"
unset _cptjax_gpu_flags

# NCCL: print its warnings (a slow or failing link), not every call.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

"""The model: HF config.json <-> ModelConfig (config.py), the Flax NNX decoder (transformer.py), its
attention kernels (attention.py), the generation KV cache (kv_cache.py), the chunked loss (loss.py)
and the logical-axis sharding rules and meshes (sharding.py). Imports only cptjax.core.
"""

"""Weights and runs on storage: Orbax checkpoints (checkpoint.py), "an HF folder or a cptjax
checkpoint?" answered once (weights.py: open_weights), `load_model` (pretrained.py), and a training
run's folder layout, named in one place (run_layout.py). Builds on cptjax.model and cptjax.hf.
"""

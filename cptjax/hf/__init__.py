"""Hugging Face formats: the key map, streaming safetensors, HF folder read and write, and
verification against transformers.

keymap.py (HF tensor names <-> cptjax parameters), safetensors.py (the file format, one tensor at
a time), read.py (an HF folder -> parameters, on the host or straight onto device shards), write.py
(parameters -> an HF folder), verify.py (an export against transformers' PyTorch model; needs torch).
Which path is an HF folder and which a cptjax checkpoint is decided in `cptjax.io.weights`, not here.
"""

"""The data pipeline: sources -> tokenize -> pack -> mix -> batches, resumable and multi-host.

config.py (the `data` config section), sources.py and records.py (documents by index from files,
ArrayRecord, TFDS and prepared corpora), tokenize.py (HF tokenizer + BOS/EOS rule), read.py
(`open_source` and the Grain read chain: indices -> token ids), packing.py (rows and the batch
layout), mixture.py (which source fills each row, by stage), pipeline.py (`build_train_pipeline`:
the resumable stream of batches), eval_sets.py (`build_eval_sets`), prepare.py (`cptjax data
prepare`, the writer of prepared corpora), vocab.py and vocab_extend.py (`cptjax vocab extend`: new
tokens for a domain), cli.py (the arguments of both commands).
"""

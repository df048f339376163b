"""The data pipeline: sources -> tokenize -> pack -> mix -> batches, resumable and multi-host.

config.py (the `data` config section), sources.py (documents by index from files), tokenize.py
(HF tokenizer + BOS/EOS rule), packing.py (rows and the batch layout), mixture.py (which source fills
each row, by stage), pipeline.py (`build_train_pipeline`), eval_sets.py (`build_eval_sets`),
prepare.py (`cptjax data prepare`), cli.py (its arguments).
"""

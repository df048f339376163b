"""What a run did, measured after the fact: `cptjax eval` (eval_models.py), `report` (report.py,
run_logs.py, plots.py), `generate` (generate.py), `merge` (merge.py, merge_sweep.py), the export's
model card (model_card.py), weight change (weight_change.py), and their arguments (cli.py).
"""

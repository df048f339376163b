"""Training: the config tree of `cptjax train` (config.py, config_reference.py), re-warm schedules and
AdamW (schedules.py, optimizer.py), the sharded train and eval steps (step.py), where a run starts
from (start.py), its crash-safe folder (run_folder.py), SIGTERM (preemption.py), multi-host start-up
(distributed.py), held-out numbers (evaluation.py), logging (metrics.py), the loop (trainer.py) and
`cptjax plan` (plan.py), which compiles that same step ahead of time.
"""

"""`cptjax train` (the CLI) with its start-up made observable, for the SIGTERM-at-start-up tests:

    python tests/startup_worker.py PHASE CONFIG

PHASE "config": the process sends itself SIGTERM as the config checks end; "load": each tensor read
from the HF folder takes 0.5 s more and prints `read N` (a slow load, for the test to signal in
the middle of); "compile": SIGTERM to itself once the train state is loaded, before the train step
compiles. The last stdout line is JSON: the tensors read and the train steps run.
"""

import dataclasses
import json
import os
import signal
import sys
import time

import cptjax.train.trainer as trainer
from cptjax.cli import main
from cptjax.hf.safetensors import SafetensorsFile

phase, config = sys.argv[1], sys.argv[2]
counts = {"reads": 0, "steps": 0}


def _sigterm_after(function):
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result
    return wrapped


read_block_into = SafetensorsFile.read_block_into


def _counted_read(self, *args, **kwargs):
    read_block_into(self, *args, **kwargs)
    counts["reads"] += 1
    if phase == "load":
        time.sleep(0.5)
        print(f"read {counts['reads']}", flush=True)


build_setup = trainer.build_setup


def _counted_steps(*args, **kwargs):
    setup = build_setup(*args, **kwargs)

    def step_fn(*step_args):
        counts["steps"] += 1
        return setup.step_fn(*step_args)
    return dataclasses.replace(setup, step_fn=step_fn)


SafetensorsFile.read_block_into = _counted_read
trainer.build_setup = _counted_steps
if phase == "config":
    trainer.check_environment = _sigterm_after(trainer.check_environment)
elif phase == "compile":
    trainer.initial_state = _sigterm_after(trainer.initial_state)
code = main(["train", "--config", config])
print(json.dumps(counts), flush=True)
sys.exit(code)

"""Runs the trainer on the stand-in data, in its own process (for signal tests).

    python tests/train_worker.py CONFIG.json
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from batches import CountingData

from cptjax.train.config import config_from_dict
from cptjax.train.trainer import run

if __name__ == "__main__":
    config = config_from_dict(json.loads(Path(sys.argv[1]).read_text()))
    vocab = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    data = CountingData(vocab, config.training.batch_size, config.training.seq_len)
    result = run(config, data=data, eval_sets={})
    print(json.dumps({"final_step": result.final_step, "stopped_early": result.stopped_early,
                      "origin": result.origin}), flush=True)

"""A pilot's checkpoint on fresh pass-key prompts of one length: the answer's NLL and exact matches.

    python probe_check.py /tmp/lc/p15 64     # -> p15_probe.txt (with 128 as well)

Prompts: cptjax.data.passkey's, depths 0, 0.5 and 1 x 16 keys (seed 99, not a training seed),
one per row, read whole; greedy exact match is every answer token the argmax given the ones before.
"""

import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[5]))
from cptjax.data.passkey import RetrievalConfig, make_prompts
from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec
from cptjax.io.pretrained import load_model


def main(run: str, length: int) -> None:
    model = load_model(f"{run}/base/checkpoints")
    prompts = make_prompts(RetrievalConfig((length,), (0.0, 0.5, 1.0), 16, 99),
                           DocumentTokenizer(load_tokenizer_spec(Path("/tmp/lc/tok"))))
    ids = np.stack([p.ids for p in prompts])
    logits = np.asarray(model.model(jax.numpy.asarray(ids)), np.float32)[:, :-1]
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), ids[:, 1:, None], -1)[..., 0]
    pred = logits.argmax(-1)
    first = np.mean([nll[i, -p.answer] for i, p in enumerate(prompts)])
    rest = np.mean([nll[i, -p.answer + 1:].mean() for i, p in enumerate(prompts)])
    exact = sum(bool((pred[i, -p.answer:] == p.ids[-p.answer:]).all()) for i, p in enumerate(prompts))
    print(f"{run} at {length} tokens: answer NLL first token {first:.2f}, the others {rest:.2f} nats; "
          f"exact {exact} of {len(prompts)}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

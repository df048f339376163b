"""One pilot of the long-context study's base (2026-12-08): does it learn to copy, and the pass-key probe?

    python pilot.py '{"out": "/tmp/lc/p5", "drill": "tokens", "copy_weight": 1.0, "passkey_weight": 0.0,
                      "base": {"steps": 1500, "eval_every": 1500, "peak_lr": 1e-3, "end_lr": 1e-4}}'

The spec (JSON) changes scripts/reproduce_long_context.py's base run: `model` and `base` keys
update STUDY's; `passkey_weight`/`copy_weight` its sources' weights (English gets the rest);
`drill: "tokens"` replaces the word drill by sequences of k distinct single-token words (`k`,
default 8-24), repeated to about `total` tokens, with `digits: n` adding each digit token
(" 0".." 9", "0".."9") n times to the pool and `numbers: p` turning each item into a random
5-digit number with probability p; `extra` adds [name, jsonl path, weight] sources (made by
make_passkey_docs.py), `only_extra` keeps only those, `stages` sets data.stages. The tokenizer
(2048 tokens, the study's) and the study's corpora are made once under /tmp/lc. Each pilot's
config.yaml and metrics.jsonl are beside this file, named by the pilot.
"""

import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[5]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
import reproduce_cpt_findings as findings  # noqa: E402
import reproduce_long_context as lc  # noqa: E402

from cptjax.demo import find_data_dir, train_tokenizer  # noqa: E402


def drill_documents(spec: dict, vocab: dict) -> list[str]:
    words = [t for t in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and len(t) >= 4]
    rng = random.Random(7)
    docs = []
    for _ in range(20000):
        k = rng.randint(*spec.get("k", [8, 24]))
        seq = rng.sample(words, k)
        if spec.get("digits"):
            pool = words + (["Ġ" + str(d) for d in range(10)] + [str(d) for d in range(10)]) * spec["digits"]
            seq = []
            while len(seq) < k:
                w = rng.choice(pool)
                if w not in seq:
                    seq.append(w)
        if spec.get("numbers"):
            seq = [w if rng.random() > spec["numbers"] else "Ġ" + str(rng.randint(10000, 99999)) for w in seq]
        docs.append("".join(w.replace("Ġ", " ") for w in seq * max(2, spec.get("total", 100) // k)))
    return docs


def main(spec: dict) -> None:
    from tokenizers import Tokenizer

    from cptjax.measure.run_logs import read_run

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    data_dir = find_data_dir(None)
    tok = Path("/tmp/lc/tok")
    if not (tok / "tokenizer.json").exists():
        train_tokenizer(tok, data_dir, vocab_size=2048)
    study = json.loads(json.dumps(lc.STUDY))
    study["model"].update(spec.get("model", {}))
    study["base"].update(spec.get("base", {}))
    study["passkey"]["weight"] = spec.get("passkey_weight", 0.3)
    study["passkey"]["copy"]["weight"] = spec.get("copy_weight", 0.3)
    corpora_dir = Path("/tmp/lc/corpora")
    if not (corpora_dir / "corpora" / "passkey.jsonl").exists():
        corpora = lc.write_corpora(corpora_dir, data_dir, study, tok)
    else:
        corpora = {p.stem: str(p) for p in (corpora_dir / "corpora").glob("*.jsonl")}
    if spec.get("drill") == "tokens":
        docs = drill_documents(spec, Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab())
        (out / "drill.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        corpora["copy"] = str(out / "drill.jsonl")
    config = lc.run_config(out / "base", study, study["base"], lc.base_model(out, study, tok), corpora,
                           study["short"], seed=0, at_start=False)
    config["data"]["sources"] = [s for s in config["data"]["sources"] if s["weight"] > 0]
    for name, path, weight in spec.get("extra", []):
        config["data"]["sources"].append({"name": name, "type": "jsonl", "paths": [path], "weight": weight})
    if spec.get("only_extra"):
        config["data"]["sources"] = config["data"]["sources"][-len(spec["extra"]):]
    if "stages" in spec:
        config["data"]["stages"] = spec["stages"]
    config["logging"]["every"] = spec.get("log_every", 20)
    start = time.time()
    findings._train(config)
    print("minutes", (time.time() - start) / 60)
    for r in read_run(out / "base").retrieval:
        print("step", r["step"], [(c["length"], c["depth"], c["accuracy"], c["answer_nll"]) for c in r["cells"]])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

"""Local lm-evaluation-harness tasks the tests write themselves (no hub): YAML over JSON Lines."""

import json
from pathlib import Path

import numpy as np
from data_helpers import jargon_paragraphs, wiki_articles


def _metric(name, aggregation="mean", higher_is_better=True):
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tasks(root: Path, mc_docs: int = 8, gen_docs: int = 6) -> Path:
    """Three lm-eval tasks in `root`: tiny_mc.yaml (multiple choice, 2-shot), tiny_rolling.yaml
    (rolling log-likelihood over wiki texts) and tiny_gen.yaml (greedy generation, 1-shot, stops at a
    newline or "s"), each over a JSON Lines file written beside it."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = " ".join(jargon_paragraphs()[:200]).split()
    mc = [{"question": " ".join(rng.choice(words, 12)), "choices": [" ".join(rng.choice(words, n)) for n in (1, 2, 3)],
           "answer": int(rng.integers(3))} for _ in range(mc_docs)]
    gen = [{"question": " ".join(rng.choice(words, 8)), "answer": str(rng.choice(words))} for _ in range(gen_docs)]
    texts = [{"text": a[:400]} for a in wiki_articles()[:3]]
    data = {"mc": _jsonl(root / "mc.jsonl", mc), "gen": _jsonl(root / "gen.jsonl", gen),
            "rolling": _jsonl(root / "rolling.jsonl", texts)}

    def source(name):
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"train": str(data[name]),
                                                                           "test": str(data[name])}},
                "training_split": "train", "test_split": "test", "fewshot_split": "train"}
    tasks = {
        "tiny_mc": {**source("mc"), "output_type": "multiple_choice", "num_fewshot": 2,
                    "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
                    "doc_to_target": "{{answer}}", "metric_list": [_metric("acc"), _metric("acc_norm")]},
        "tiny_rolling": {**source("rolling"), "output_type": "loglikelihood_rolling", "doc_to_text": "",
                         "doc_to_target": "{{text}}",
                         "metric_list": [_metric("word_perplexity", "weighted_perplexity", False),
                                         _metric("byte_perplexity", "weighted_perplexity", False),
                                         _metric("bits_per_byte", "bits_per_byte", False)]},
        "tiny_gen": {**source("gen"), "output_type": "generate_until", "num_fewshot": 1,
                     "doc_to_text": "Q: {{question}}\nA:", "doc_to_target": "{{answer}}",
                     "generation_kwargs": {"until": ["\n", "s"], "max_gen_toks": 10, "do_sample": False},
                     "metric_list": [_metric("exact_match")]},
    }
    for name, task in tasks.items():
        (root / f"{name}.yaml").write_text(json.dumps({"task": name, **task}, indent=1))
    return root

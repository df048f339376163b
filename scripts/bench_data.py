"""Data pipeline throughput, in tokens per second per CPU core.

    python scripts/bench_data.py [--tokenizer HF_DIR] [--seconds 15] [--out FILE]

Measures, on the Python standard library's sources as JSON Lines (a real code corpus on every
machine) mixed 0.9/0.1 with WikiText-2 from data/:
  tokenizer  the tokenizer alone (batched, one thread) over the same texts;
  (a) raw    JSON Lines -> tokenize -> pack -> mix -> batch (tokenizing in this process);
  (b) prepared  `cptjax data prepare` ArrayRecord shards -> pack -> mix -> batch.
"Per core" divides tokens by the CPU seconds the process used (all threads), so it does not depend
on how many cores the machine has. Without --tokenizer, a byte-level BPE with 32,768 tokens is
trained on the corpus first (not timed). Goal: (b) >= 1,000,000 tokens/s per core; (a) is bounded
by the tokenizer, and the ratio (a) / tokenizer says how close it gets. Writes the raw record
(scripts/bench_record.py: command, commit, machine, load average) to docs/benchmarks/data_<date>.json,
or --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path

import bench_record

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread: a per-core number

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, BATCH = 2048, 16


def stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    excluded = ("test", "idlelib", "site-packages")
    files = sorted(p for p in root.rglob("*.py")
                   if not any(part in excluded for part in p.relative_to(root).parts))
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def wiki_texts() -> list[str]:
    text = (REPO / "data" / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    import re

    return [p.strip("\n") for p in re.split(r"\n(?= = [^=].* = \n)", text) if p.strip()]


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def train_tokenizer(texts: list[str], out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32768, special_tokens=[bos, eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos,
                            eos_token=eos).save_pretrained(out)
    return out


def run_pipeline(config, tokenizer_dir, seconds: float) -> dict:
    from cptjax.data.pipeline import build_train_pipeline

    pipeline = build_train_pipeline(config, tokenizer_dir, seq_len=SEQ_LEN, batch_size=BATCH,
                                    process_index=0, process_count=1)
    next(pipeline)  # start-up (opening files, the first reads) is not throughput
    tokens, batches = 0, 0
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        batch = next(pipeline)
        tokens += int((batch["segment_ids"] > 0).sum())
        batches += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    shares = pipeline.realized_shares()
    pipeline.close()
    return {"tokens": tokens, "batches": batches, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "tokens_per_s": round(tokens / wall), "tokens_per_s_per_core": round(tokens / cpu),
            "realized_shares": {k: round(v, 4) for k, v in shares.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="HF tokenizer folder (default: train one here)")
    parser.add_argument("--seconds", type=float, default=15.0, help="time per measurement")
    parser.add_argument("--out", help="JSON record (default: a new docs/benchmarks/data_<date>.json)")
    args = parser.parse_args()
    record = bench_record.begin("data", ("grain", "tokenizers", "transformers", "array-record"))

    from cptjax.data.config import DataConfig, InputConfig, SourceConfig
    from cptjax.data.prepare import prepare_corpus
    from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec

    work = Path(tempfile.mkdtemp(prefix="cptjax-bench-data-"))
    code, wiki = stdlib_texts(), wiki_texts()
    write_jsonl(work / "code.jsonl", code)
    write_jsonl(work / "wiki.jsonl", wiki)
    tokenizer_dir = args.tokenizer or train_tokenizer(code[::4] + wiki, work / "tokenizer")
    print(f"corpus: {len(code)} stdlib files ({sum(map(len, code)) / 1e6:.1f}M chars), "
          f"{len(wiki)} WikiText articles; tokenizer {tokenizer_dir}", flush=True)

    tokenizer = DocumentTokenizer(load_tokenizer_spec(tokenizer_dir))
    texts = code + wiki
    cpu = time.process_time()
    wall = time.perf_counter()
    count = sum(len(ids) for start in range(0, len(texts), 32)
                for ids in tokenizer.encode_batch(texts[start:start + 32]))
    tok_cpu, tok_wall = time.process_time() - cpu, time.perf_counter() - wall
    results = {"tokenizer": {"tokens": count, "wall_s": round(tok_wall, 2),
                             "cpu_s": round(tok_cpu, 2), "tokens_per_s": round(count / tok_wall),
                             "tokens_per_s_per_core": round(count / tok_cpu)}}
    print(f"tokenizer alone: {count / tok_cpu:,.0f} tokens/s per core", flush=True)

    def config(code_source, wiki_source):
        return DataConfig(sources=(code_source, wiki_source), seed=0, prefetch=0)

    raw = config(SourceConfig(name="code", type="jsonl", paths=(str(work / "code.jsonl"),), weight=0.9),
                 SourceConfig(name="wiki", type="jsonl", paths=(str(work / "wiki.jsonl"),), weight=0.1))
    results["raw_jsonl"] = run_pipeline(raw, tokenizer_dir, args.seconds)
    print(f"(a) raw JSON Lines: {results['raw_jsonl']['tokens_per_s_per_core']:,} tokens/s per core",
          flush=True)

    start = time.perf_counter()
    for name in ("code", "wiki"):
        prepare_corpus(InputConfig(name=name, type="jsonl", paths=(str(work / f"{name}.jsonl"),)),
                       tokenizer_dir, work / f"{name}-prepared", num_shards=4)
    results["prepare_s"] = round(time.perf_counter() - start, 2)
    prepared = config(
        SourceConfig(name="code", type="prepared", paths=(str(work / "code-prepared"),), weight=0.9),
        SourceConfig(name="wiki", type="prepared", paths=(str(work / "wiki-prepared"),), weight=0.1))
    results["prepared_arrayrecord"] = run_pipeline(prepared, tokenizer_dir, args.seconds)
    print(f"(b) prepared ArrayRecord: "
          f"{results['prepared_arrayrecord']['tokens_per_s_per_core']:,} tokens/s per core",
          flush=True)

    results["ratio_raw_to_tokenizer"] = round(
        results["raw_jsonl"]["tokens_per_s_per_core"] / results["tokenizer"]["tokens_per_s_per_core"], 3)
    results["goal_prepared_1M_per_core_met"] = bool(
        results["prepared_arrayrecord"]["tokens_per_s_per_core"] >= 1_000_000)
    results["setup"] = {"seq_len": SEQ_LEN, "batch_rows": BATCH, "mixture": [0.9, 0.1],
                        "seconds_per_measurement": args.seconds,
                        "tokenizer": args.tokenizer or "byte-level BPE, 32,768 tokens, trained on the corpus"}
    print(json.dumps(results, indent=2))
    bench_record.finish(record, results, args.out)
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

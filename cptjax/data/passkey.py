"""The synthetic retrieval probe: pass-key prompts made from the run's own tokenizer.

A prompt of `length` tokens (answer included) is, in token ids:

    BOS? + filler[:a] + " The pass key is" + KEY + ". Remember it." + filler[a:] +
    " What is the pass key? The pass key is" + KEY

where filler is the classic repeated text of the passkey test (Mohtashami and Jaggi 2023), cut to
fill the length exactly, and a = round(depth x filler tokens): depth 0 puts the needle right after
BOS, depth 1 right before the question. KEY is " " + a random 5-digit number; its tokens are
identical in the needle and as the answer, since each piece is tokenized alone and the ids are
concatenated (the prompt is a valid token sequence, not necessarily the tokenizer's own split of
the whole text). Keys and filler offsets come from `seed`, the length, the depth and the sample
number: the same config gives the same prompts on every host and in every run.

The prompts are packed into rows of the eval batch layout (packing.BATCH_KEYS), as many whole
prompts per row as fit, one segment each, so attention never crosses prompts; `loss_mask` is 1 on
the answer's targets only. `answer_index` [R, M] lists each row's answer target positions and
`answer_sample` [R, M] the prompt each belongs to (-1: unused slot).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cptjax.core.errors import CptjaxError
from cptjax.data.packing import rows_per_process, rows_to_batch
from cptjax.data.tokenize import DocumentTokenizer

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = (" The pass key is", ". Remember it.")
QUESTION = " What is the pass key? The pass key is"


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """The pass-key probe: prompts at each length and depth; accuracy is greedy exact match."""

    lengths: tuple[int, ...]  # prompt lengths in tokens, answer included; each at most the row length
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # needle in the filler (0 first): default 0-1 by 0.25
    samples: int = 4  # prompts per length and depth, each with its own key
    seed: int = 0  # the keys and the filler offsets

    def __post_init__(self):
        self.validate("eval.retrieval")

    def validate(self, key: str) -> None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise CptjaxError(f"{key}.lengths: give one or more prompt lengths in tokens, e.g. [1024, 4096]")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise CptjaxError(f"{key}.depths: give one or more depths in [0, 1] (0: the needle first)")
        if self.samples < 1:
            raise CptjaxError(f"{key}.samples: must be >= 1, got {self.samples}")

    def check_length(self, seq_len: int, key: str, fix: str) -> None:
        """Every prompt fits a row of `seq_len` tokens."""
        too_long = [n for n in self.lengths if n > seq_len]
        if too_long:
            raise CptjaxError(f"{key}.lengths {too_long}: longer than the rows ({seq_len} tokens); {fix}")


@dataclasses.dataclass(frozen=True)
class Prompt:
    length: int
    depth: float
    key: str  # the digits
    ids: np.ndarray  # [length] int32, answer included
    answer: int  # how many of the last ids are the answer
    needle: int  # index of the needle's first token


def _ids(tokenizer: DocumentTokenizer, text: str) -> np.ndarray:
    """The ids of `text` alone: no BOS, no EOS."""
    return tokenizer.encode_prompt(text)[tokenizer.spec.bos_id is not None:]


def make_prompts(config: RetrievalConfig, tokenizer: DocumentTokenizer, key: str = "eval.retrieval") -> list[Prompt]:
    """Every prompt of the probe, by length, then depth, then sample."""
    bos = [] if tokenizer.spec.bos_id is None else [tokenizer.spec.bos_id]
    filler, before, after, question = (_ids(tokenizer, t) for t in (FILLER, *NEEDLE, QUESTION))
    prompts = []
    for length in config.lengths:
        for depth in config.depths:
            for sample in range(config.samples):
                rng = np.random.default_rng([config.seed, length, round(depth * 1e6), sample])
                digits = str(rng.integers(10000, 100000))
                answer = _ids(tokenizer, " " + digits)
                fixed = len(bos) + len(before) + len(after) + len(question) + 2 * len(answer)
                room = length - fixed
                if room < 0:
                    raise CptjaxError(f"{key}.lengths: {length} tokens cannot hold the pass-key needle and "
                                      f"question ({fixed} tokens with this tokenizer); use lengths >= {fixed}")
                start = int(rng.integers(len(filler)))
                text = np.resize(np.roll(filler, -start), room)  # the filler repeated from `start`
                cut = round(depth * room)
                ids = np.concatenate([bos, text[:cut], before, answer, after, text[cut:], question, answer])
                prompts.append(Prompt(length, depth, digits, ids.astype(np.int32), len(answer),
                                      len(bos) + cut))
    return prompts


def probe_batches(prompts: list[Prompt], *, seq_len: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1, answers: list[np.ndarray] | None = None) -> list[dict]:
    """The prompts packed into batches of `batch_size` rows of `seq_len` (this process's rows);
    `answers` replaces each prompt's answer ids (same lengths; a test's wrong answers)."""
    rows_mine = rows_per_process(batch_size, process_index, process_count)
    rows: list[list[int]] = []
    used = seq_len + 1  # rows are L + 1 tokens; the first prompt opens a new row
    for i, p in enumerate(prompts):
        if p.length > seq_len:
            raise CptjaxError(f"eval.retrieval.lengths: {p.length} exceeds the rows' {seq_len} tokens")
        if used + p.length > seq_len + 1:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += p.length
    rows += [[] for _ in range(-len(rows) % batch_size)]
    width = max(p.answer for p in prompts)
    slots = max(len(r) for r in rows) * width
    tokens = np.zeros((len(rows), seq_len + 1), np.int32)
    segments = np.zeros((len(rows), seq_len + 1), np.int32)
    answer_index = np.zeros((len(rows), slots), np.int32)
    answer_sample = np.full((len(rows), slots), -1, np.int32)
    for r, members in enumerate(rows):
        at = 0
        for k, i in enumerate(members):
            p = prompts[i]
            ids = p.ids if answers is None else np.concatenate([p.ids[:-p.answer], answers[i]])
            tokens[r, at:at + p.length] = ids
            segments[r, at:at + p.length] = k + 1
            # The answer's tokens are targets of the inputs just before them.
            first = at + p.length - p.answer - 1
            answer_index[r, k * width:k * width + p.answer] = np.arange(first, first + p.answer)
            answer_sample[r, k * width:k * width + p.answer] = i
            at += p.length
    batches = []
    for first in range(0, len(rows), batch_size):
        mine = slice(first + process_index * rows_mine, first + (process_index + 1) * rows_mine)
        batch = rows_to_batch(tokens[mine], segments[mine], np.zeros(rows_mine, np.int32))
        batch["loss_mask"] = np.zeros_like(batch["loss_mask"])
        for r in range(rows_mine):
            used_slots = answer_sample[mine][r] >= 0
            batch["loss_mask"][r, answer_index[mine][r][used_slots]] = 1.0
        batch["answer_index"] = answer_index[mine]
        batch["answer_sample"] = answer_sample[mine]
        batches.append(batch)
    return batches

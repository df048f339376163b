"""Pass-key training documents that fill whole rows: /tmp/lc/passkey_64.jsonl and passkey_128.jsonl.

Rows are cut from each source's concatenated stream (cptjax/data/packing.py), so a document of
exactly L tokens (BOS and EOS included) in a source of only such documents is never split across
rows of L, 2L, ... tokens. The probe's own prompts (another seed, 11 depths) at length L - 1 are
decoded and kept when the study's tokenizer gives them back at L tokens with the same answer.
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[5]))
from tokenizers import Tokenizer

from cptjax.data.passkey import RetrievalConfig, make_prompts
from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec

tok = Path("/tmp/lc/tok")
trained = Tokenizer.from_file(str(tok / "tokenizer.json"))
document_tokenizer = DocumentTokenizer(load_tokenizer_spec(tok))
for row, samples in ((64, 1500), (128, 1000)):
    prompts = make_prompts(RetrievalConfig((row - 1,), tuple(i / 10 for i in range(11)), samples, 1000 + row),
                           document_tokenizer)
    docs, dropped = [], 0
    for p in prompts:
        text = trained.decode(p.ids.tolist(), skip_special_tokens=True)
        ids = document_tokenizer.encode_prompt(text)
        if len(ids) + 1 == row and (ids[-p.answer:] == p.ids[-p.answer:]).all():
            docs.append(text)
        else:
            dropped += 1
    random.Random(row).shuffle(docs)
    Path(f"/tmp/lc/passkey_{row}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    print(row, len(docs), "kept,", dropped, "dropped")

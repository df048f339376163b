"""Pass-key training documents that fill whole rows: /tmp/lc/passkey_64.jsonl and passkey_128.jsonl.

The study's own `passkey_documents` (scripts/reproduce_long_context.py: documents of exactly n
tokens, so that packing never splits one across rows of a multiple of n), at the pilots' sample
counts, shuffled.
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[5] / "scripts"))
import reproduce_long_context as lc

for row, samples in ((64, 1500), (128, 1000)):
    study = {"passkey": {"rows": [row], "depths": 11, "samples": samples, "seed": 1000}}
    docs = lc.passkey_documents(study, Path("/tmp/lc/tok"))[row]
    random.Random(row).shuffle(docs)
    Path(f"/tmp/lc/passkey_{row}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    print(row, len(docs), "kept of", 11 * samples)

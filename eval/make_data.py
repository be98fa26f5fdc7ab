"""Regenerate the local lm-eval data in eval/tasks/data/ from the embedded tinyshakespeare corpus (no download).

    python eval/make_data.py

Held-out text = the last 3% of data/tinyshakespeare/input.txt (by characters, cut at a blank line).
Note: the pretraining split (`949,50,1` over shuffled-in-split documents) is by document index, so this tail
lies in megatron's valid/test document ranges for the default corpus; a model trained on another corpus
simply sees unrelated English verse.
- shakespeare_heldout.jsonl: {"text"} passages of ~5 speeches (loglikelihood_rolling perplexity task).
- shakespeare_next_line.jsonl: {"context", "choices", "label"}: a speech's first line, the true next line
  and 3 distractor lines drawn from other held-out speeches (seeded), for a multiple-choice task.
"""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
text = (ROOT / "data" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
cut = text.index("\n\n", int(len(text) * 0.97)) + 2
speeches = [s.strip("\n") for s in text[cut:].split("\n\n") if s.strip()]
out = ROOT / "eval" / "tasks" / "data"
out.mkdir(parents=True, exist_ok=True)

passages = ["\n\n".join(speeches[i:i + 5]) for i in range(0, len(speeches), 5)][:40]
with open(out / "shakespeare_heldout.jsonl", "w", encoding="utf-8") as f:
    for p in passages:
        f.write(json.dumps({"text": p}) + "\n")

rng = random.Random(0)
lines = [ln for s in speeches for ln in s.split("\n")[1:] if len(ln) > 20]
items = []
for s in speeches:
    body = s.split("\n")
    if len(body) >= 3 and len(body[1]) > 20 and len(body[2]) > 20:  # speaker, line 1, line 2
        ctx, true = body[0] + "\n" + body[1] + "\n", body[2]
        distract = rng.sample([ln for ln in lines if ln != true], 3)
        label = rng.randrange(4)
        choices = distract[:label] + [true] + distract[label:]
        items.append({"context": ctx, "choices": choices, "label": label})
    if len(items) == 60:
        break
with open(out / "shakespeare_next_line.jsonl", "w", encoding="utf-8") as f:
    for it in items:
        f.write(json.dumps(it) + "\n")
print(f"{len(passages)} passages, {len(items)} multiple-choice items -> {out}")

"""Perplexity of a model on held-out tokens of a megatron IndexedDataset.

    python -m pretrain.evaluate --model HF_DIR|RUN_DIR|RUN_DIR/TAG|MODEL_DIR --data PREFIX [--split 949,50,1
        --part test] [--seq-len 128] [--max-tokens 100000] [--num-steps K] [--batch-size 8] [--out result.json]

Design choices
- An exported folder is loaded the way users load it: `AutoModelForCausalLM.from_pretrained(HF_DIR,
  trust_remote_code=True)` (pretrain/convert.py export). A run folder, a checkpoint tag or any model folder
  (pretrain/model_dir.py) is read like `pretrain.convert` reads it (newest usable tag of a run folder) and wrapped
  in the same transformers class in memory, with no export written. On CPU or the first CUDA device, eval mode.
- Data: the `.bin/.idx` pair written by the preprocessing (documents already tokenised, one EOS per
  document). `--part valid|test` takes the same contiguous document range megatron's
  BlendedMegatronDatasetBuilder gives that split (`convert_split_vector_to_split_matrix`, round(lo * N) ..
  round(hi * N)), so "held-out" means the documents the trainer never drew training samples from.
- Documents are concatenated and cut into non-overlapping windows of `seq_len` tokens (the last partial
  window is kept if it has >= 2 tokens); inside a window each token after the first is predicted from its
  prefix in that window. Perplexity = exp(sum NLL / tokens predicted), accumulated in float64.
- The recurrent K of ReSSFormer (R2MU, paper sec. 3.1) is `--num-steps` (default: the exported config's
  `num_steps`, else the training `r2mu.steps`); the result reports the K used (null for the dense baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch


def document_range(n_docs: int, split: str, part: str) -> tuple[int, int]:
    """[beg, end) documents of `part` (train|valid|test|all) under megatron's split rule."""
    if part == "all":
        return 0, n_docs
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    parts = ("train", "valid", "test")
    if part not in parts:
        raise ValueError(f"--part {part!r}: choose train, valid, test or all")
    bounds = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))[parts.index(part)]
    if bounds is None:
        raise ValueError(f"--split {split!r} gives the {part} part no documents")
    beg, end = int(round(bounds[0] * n_docs)), int(round(bounds[1] * n_docs))
    if end <= beg:
        raise ValueError(f"--split {split!r} gives the {part} part of {n_docs} documents no document")
    return beg, end


def load_tokens(prefix: str, split: str = "949,50,1", part: str = "all", max_tokens: int | None = None) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise FileNotFoundError(f"--data {prefix!r}: {prefix + ext} is missing (give the prefix without "
                                    f".bin/.idx, as written by the preprocessing)")
    ds = IndexedDataset(prefix, multimodal=False, mmap=True)
    beg, end = document_range(len(ds), split, part)
    out, n = [], 0
    for i in range(beg, end):
        doc = np.asarray(ds[i], dtype=np.int64)
        out.append(doc)
        n += len(doc)
        if max_tokens is not None and n >= max_tokens:
            break
    toks = np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
    return toks[:max_tokens] if max_tokens is not None else toks


def used_num_steps(config, num_steps: int | None) -> int | None:
    """The K a forward of the exported model runs: num_steps, else config.num_steps, else the training r2mu.steps
    (pretrain/hf/modeling_ressformer.py); None for the dense baseline (no recurrence)."""
    r = getattr(config, "ressformer", None) or {}
    if r.get("arch") == "transformer":
        return None
    if num_steps is not None:
        return int(num_steps)
    if getattr(config, "num_steps", None) is not None:
        return int(config.num_steps)
    return int(r["r2mu"]["steps"])


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8, num_steps: int | None = None,
               eos_id: int | None = None) -> dict:
    """Non-overlapping windows of seq_len; -> {"ppl", "nll", "tokens", "windows"}. eos_id: document masking (the
    model's `documents`, a new document after each EOS), as a run with data.document_mask trains and validates."""
    if len(tokens) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(tokens)}")
    vocab = model.get_output_embeddings().weight.shape[0]
    if int(tokens.max()) >= vocab:
        raise ValueError(f"token id {int(tokens.max())} >= model vocab {vocab}: the data was tokenised with another "
                         f"tokenizer than the model's")
    dev = next(model.parameters()).device
    windows = [tokens[i:i + seq_len] for i in range(0, len(tokens), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    nll, count = 0.0, 0
    kw = {} if num_steps is None else {"num_steps": num_steps}
    for b in range(0, len(windows), batch_size):
        group = windows[b:b + batch_size]
        L = max(len(w) for w in group)
        ids = torch.zeros(len(group), L, dtype=torch.long)
        mask = torch.zeros(len(group), L, dtype=torch.long)
        for j, w in enumerate(group):
            ids[j, :len(w)] = torch.from_numpy(w)
            mask[j, :len(w)] = 1  # right padding: causal model, real tokens unaffected
        ids, mask = ids.to(dev), mask.to(dev)
        if eos_id is not None:  # right padding stays after the last document: causal, it changes nothing
            from ressformer.selection import document_ids

            kw["documents"] = document_ids(ids, eos_id)
        logits = model(input_ids=ids, attention_mask=mask, **kw).logits.float()  # (B, L, V)
        lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, L-1)
        m = mask[:, 1:].bool()
        nll -= lp[m].double().sum().item()
        count += int(m.sum())
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows)}


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """An HF export (config.json) through AutoModelForCausalLM; a run folder, tag or model folder in memory."""
    p = Path(path)
    if (p / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True, dtype=dtype)
    from pretrain.convert import hf_model, read_any
    from ressformer.config import ModelConfig

    sd, mcfg, info = read_any(p)
    print(f"[evaluate] {info.get('tag', p)}", file=sys.stderr)
    return hf_model(sd, ModelConfig.from_dict(mcfg) if isinstance(mcfg, dict) else mcfg).to(dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True,
                    help="exported HF folder (python -m pretrain.convert), or a run folder / checkpoint tag / model folder")
    ap.add_argument("--data", required=True, help="IndexedDataset prefix (PREFIX.bin / PREFIX.idx)")
    ap.add_argument("--split", default="949,50,1", help="the training run's data split (document ratios)")
    ap.add_argument("--part", default="all", choices=["train", "valid", "test", "all"],
                    help="documents to score: a split part or all of them")
    ap.add_argument("--seq-len", type=int, default=0, help="window length (0: the model's max_position_embeddings)")
    ap.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    ap.add_argument("--num-steps", type=int, default=None, help="recurrent steps K (default: the model config's)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--document-mask", action="store_true",
                    help="score with document masking (no token reads another document of its window), as a run "
                         "with data.document_mask trains; needs the model config's eos_token_id")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--out", default=None, help="also write the result JSON here")
    a = ap.parse_args(argv)

    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    model = load_model(a.model, dtype)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    seq_len = a.seq_len or int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if seq_len < 2:
        raise SystemExit(f"--seq-len {a.seq_len}: give a window length >= 2 (the model config has none)")
    toks = load_tokens(a.data, a.split, a.part, a.max_tokens)
    eos = None
    if a.document_mask:
        eos = getattr(model.config, "eos_token_id", None)
        if eos is None:
            raise SystemExit(f"--document-mask: {a.model} has no eos_token_id in its config (export it with its "
                             "tokenizer) to find the documents by")
    res = perplexity(model, toks, seq_len, a.batch_size, a.num_steps, eos_id=eos)
    res.update({"model": str(a.model), "data": a.data, "part": a.part, "split": a.split, "seq_len": seq_len,
                "num_steps": used_num_steps(model.config, a.num_steps), "document_mask": a.document_mask})
    print(json.dumps(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

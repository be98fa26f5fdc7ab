"""Hugging Face `transformers` wrapper of the ReSSFormer model, exported next to the weights by
`python -m pretrain.convert` (remote code: these files plus the ressformer package files are copied into
the export folder, so `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` needs no install)."""

#!/usr/bin/env bash
# The main job on the embedded default, end to end, on CPU ranks (a few minutes on 2 cores):
#   1. set up .venv (scripts/setup.sh)
#   2. train the sentencepiece tokenizer and preprocess data/tinyshakespeare into megatron indexed
#      datasets (python -m pretrain.data prepare -> artifacts/)
#   3. pretrain the debug ReSSFormer with ZeRO-3 + activation checkpointing on 2 ranks
#      (deepspeed pretrain/main.py -> runs/debug/, checkpoints, metrics.jsonl)
#   4. convert the final checkpoint to a Hugging Face folder (safetensors + transformers class)
#   5. evaluate: held-out perplexity (pretrain.evaluate), lm-eval on the local tasks, a greedy sample
#
# Environment overrides: RUN_DIR (runs/debug), STEPS (the config's 200), NPROC (2 ranks),
# DS_CONFIG (ds_configs/zero3.json), EVAL_LIMIT (lm-eval --limit; empty = full tasks).
# Extra arguments go to pretrain/main.py, e.g. `bash scripts/main.sh --set model.asam.topk=0`.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/debug}
NPROC=${NPROC:-2}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
EVAL_LIMIT=${EVAL_LIMIT:-}
HF_DIR="$RUN_DIR/hf"

bash scripts/setup.sh
. .venv/bin/activate
export WANDB_MODE=${WANDB_MODE:-offline} HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_OFFLINE=1
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu
  # one rank per core share: torch's default (all cores per rank) oversubscribes the CPU
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
t0=$SECONDS
step() { echo; echo "=== [$((SECONDS - t0))s] $*"; }

step "tokenizer + indexed datasets (artifacts/)"
python -m pretrain.data prepare --out artifacts

step "pretraining: $NPROC ranks, $DS_CONFIG, run folder $RUN_DIR"
if [ -f "$RUN_DIR/FINISHED" ]; then
  echo "$RUN_DIR/FINISHED exists: pretraining already done (delete $RUN_DIR to train again)"
else
  set -- --set "run_dir=$RUN_DIR" ${STEPS:+--set "steps=$STEPS"} "$@"
  deepspeed --num_gpus "$NPROC" pretrain/main.py --ds_config "$DS_CONFIG" \
    --config pretrain/configs/debug.yaml --resume auto "$@"
fi
if [ ! -f "$RUN_DIR/FINISHED" ]; then
  echo "pretraining stopped before its last step (no $RUN_DIR/FINISHED); re-run this script to resume" >&2
  exit 1
fi

step "conversion to Hugging Face: $HF_DIR"
rm -rf "$HF_DIR"
python -m pretrain.convert --checkpoint "$RUN_DIR" --out "$HF_DIR"

step "held-out perplexity (test part of the split)"
python -m pretrain.evaluate --model "$HF_DIR" --data artifacts/data/shakespeare --part test --seq-len 128 \
  --out "$RUN_DIR/eval_ppl.json"

step "lm-evaluation-harness on eval/tasks"
lm-eval run --model hf --model_args "pretrained=$HF_DIR,trust_remote_code=True" --trust_remote_code \
  --include_path eval/tasks --tasks ressformer_shakespeare_ppl ressformer_shakespeare_next_line \
  --batch_size 1 --device cpu --output_path "$RUN_DIR/lm_eval" ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"}

step "greedy sample from the exported model"
python - "$HF_DIR" <<'EOF'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
ids = tok("ROMEO:\n", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))
EOF

step "summary"
python - "$RUN_DIR" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
val = [(r["step"], r["val_ppl"]) for r in recs if "val_ppl" in r]
print("validation perplexity by step: " + ", ".join(f"{s}: {p:.1f}" for s, p in val))
if len(val) >= 2:
    print(f"fell from {val[0][1]:.1f} to {val[-1][1]:.1f} ({val[0][1] / val[-1][1]:.1f}x lower)")
print("held-out test perplexity of the export:", json.loads((run / "eval_ppl.json").read_text()).get("ppl"))
if (run / "metrics.png").is_file():
    print(f"plot of the run: {run / 'metrics.png'} (python -m pretrain.plot RUN_DIR ... overlays runs)")
EOF
echo "done in $((SECONDS - t0))s: checkpoints in $RUN_DIR, Hugging Face export in $HF_DIR, lm-eval results in $RUN_DIR/lm_eval"

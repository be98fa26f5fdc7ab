#!/usr/bin/env bash
# One-shot GPU check of the fast paths (about 9.5 minutes at most on one H100 / H200), run from the repo root:
#   1. the kernel parity tests natively on CUDA: tests/test_asam_kernel.py (ASAM Triton top-k kernel),
#      tests/test_fused_loss.py (liger fused LM loss) and tests/test_moe.py (grouped GEMM experts vs the loop)
#   1b. bench/moe_experts.py: the MoE layer's loop vs torch._grouped_mm, 125m and 1b widths, bf16
#   2. bench/attention.py, T = 1k .. 64k: ASAM (torch paths and the Triton kernel) vs SDPA / FlexAttention / AdaSplash
#   3. bench/train_throughput.py: tokens/s, TFLOP/s and MFU of 125m, 1b and their compute-matched dense Transformers
#   4. bench/memory_check.py: pretrain.memory_estimate vs torch.cuda.max_memory_allocated of a 3-step DeepSpeed run
#      (125m, T=4096, ZeRO-3, one GPU; skipped without the train extra)
# Everything goes to $OUT (default ./gpu_out): gpu_check.log (all output), env.txt, pytest.xml, moe_experts.json,
# attention.json, train_throughput.json, memory_check.json. Each step has its own time limit and the benches write
# their JSON after every row, so a step that runs long still leaves its finished rows and the next step runs.
#
# Python: $PYTHON (default python3; it needs torch with CUDA, triton, pytest, pyyaml, numpy). liger-kernel and
# adasplash are optional: the fused-loss tests need liger, the AdaSplash rows need adasplash. On a machine without
# network, carry them as wheels in .whl/ (pure-Python wheels, ~1 MB), prepared where pip works:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5 adasplash==0.2.2
# and this script installs them into a temporary site folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
    && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  date -u
  git rev-parse HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("torch", "triton", "liger_kernel", "adasplash", "numpy", "pytest"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: torch sees no CUDA device; nothing to check"; exit 1; }

status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, report, keep going
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}

step "kernel parity tests" 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_asam_kernel.py \
  tests/test_fused_loss.py tests/test_moe.py --junitxml="$OUT/pytest.xml"
step "moe experts bench" 40 "$PY" bench/moe_experts.py --device cuda --dtype bfloat16 --presets 125m 1b \
  --tokens 16384 --json "$OUT/moe_experts.json"
step "attention bench" 160 "$PY" bench/attention.py --device cuda --dtype bfloat16 \
  --seq-lens 1024 2048 4096 8192 16384 32768 65536 --repeats 2 --budget-s 5 --max-total-s 120 \
  --json "$OUT/attention.json"
step "training throughput" 110 "$PY" bench/train_throughput.py --device cuda \
  --presets 125m dense:125m 1b dense:1b --batch 1 --steps 8 --warmup 2 --max-seconds 12 \
  --json "$OUT/train_throughput.json"
if "$PY" -c "import deepspeed, megatron.core, sentencepiece" 2>/dev/null; then
  step "memory estimate vs measured" 110 bash -c '"$0" -m pretrain.data prepare --out "$1/artifacts" \
    > "$1/prepare.log" 2>&1 && "$0" bench/memory_check.py --set model=125m --set seq_len=4096 \
    --set micro_batch=1 --set model.r2mu.step_sampling=fixed --set "data.blend=[[1.0, $1/artifacts/data/shakespeare]]" \
    --set "data.tokenizer=$1/artifacts/tokenizer" --steps 3 --timeout 90 --json "$1/memory_check.json"' "$PY" "$OUT"
else
  echo "=== memory estimate vs measured: skipped (needs deepspeed, megatron-core and sentencepiece:" \
       "pip install -e '.[train]')"
fi
echo "gpu_check: done, status $status; results in $OUT"
exit $status

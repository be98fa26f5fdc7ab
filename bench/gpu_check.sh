#!/usr/bin/env bash
# One-shot GPU check of the fast paths (about 10 minutes at most on one H100 / H200), run from the repo root. Steps,
# each with its id (arguments choose among them):
#   preflight   python -m pretrain.preflight for the 125m paper model: the fused kernels against their PyTorch paths on
#               this device, bf16 matmul TFLOP/s against the peak, free memory against the estimate (preflight.txt;
#               needs deepspeed)
#   kernels     the kernel parity tests natively on CUDA: tests/ressformer/test_asam_kernel.py (ASAM Triton top-k
#               kernel), tests/ressformer/test_fused_loss.py (the fused LM loss on liger's kernel, host reads
#               included) and tests/ressformer/test_moe.py (grouped GEMM experts vs the loop)
#   step        the training step as a GPU runs it (bench/train_throughput.py --sync-check --compile eager default
#               reduce-overhead): 125m and dense:125m at T=1024 in bf16 (weights too, as the trainer's DeepSpeed
#               bf16 mode computes: the experts' grouped GEMM takes bf16 inputs only); one step of each with every
#               synchronizing CUDA call recorded (torch.cuda.set_sync_debug_mode; the step fails on any), then
#               eager / compiled / reduce-overhead (CUDA graphs) timed, ratios to eager and to dense:125m in the same
#               mode, Dynamo's graphs, breaks and cudagraph skips (compiled_step.json)
#   moe         bench/moe_experts.py: the MoE layer's loop vs torch._grouped_mm, 125m and 1b widths, bf16
#   attention   bench/attention.py, T = 1k .. 64k: ASAM (torch paths and the Triton kernel) vs SDPA / FlexAttention /
#               AdaSplash
#   throughput  bench/train_throughput.py: tokens/s, TFLOP/s and MFU of 1b and its compute-matched dense Transformer
#               (125m's: the step check's eager rows)
#   pretrain    the trainer as users run it: `deepspeed --num_gpus 1 pretrain/main.py`, the 125m paper model, T=1024,
#               ZeRO-3 (ds_configs/zero3.json), 5 steps with a validation and the final checkpoint, on the default
#               corpus (python -m pretrain.data prepare; without Hugging Face datasets, the copy in .whl/artifacts);
#               the first step compiles the Triton kernels
#   memory      bench/memory_check.py: pretrain.memory_estimate vs torch.cuda.max_memory_allocated of a 3-step
#               DeepSpeed run (125m with max_seq_len raised to 4096, T=4096, ZeRO-3, one GPU)
#   pretrain and memory need deepspeed, megatron-core and sentencepiece (skipped without them).
# Everything goes to $OUT (default ./gpu_out): gpu_check.log (all output), env.txt, pytest.xml, moe_experts.json,
# preflight.txt, compiled_step.json, attention.json, train_throughput.json, prepare.log, pretrain_125m.log with the
# run's metrics.jsonl and run_info.json, memory_check.json. Each step has its own time limit and the benches write
# their JSON after every row, so a step that runs long still leaves its finished rows and the next step runs.
# Arguments name the steps to run (default: all, in the order above; their limits add up to 570 s), e.g.
# `bash bench/gpu_check.sh step` reruns the training-step check alone (pretrain and memory prepare the data first).
#
# Python: $PYTHON (default python3; it needs torch with CUDA, triton, pytest, pyyaml, numpy). What else the steps
# need (deepspeed, megatron-core, liger-kernel, adasplash, sentencepiece and their dependencies; wandb is not used) a
# machine without network gets as wheels in .whl/ (git-ignored), prepared where pip works by
#   bash bench/gpu_wheels.sh          # Python 3.12, manylinux x86_64, and the prepared corpus; about 13 MB
# This script installs the wheels of .whl/requirements.txt and of their dependencies that this Python lacks (or has
# at a version a requirement rules out) into a temporary site folder first on PYTHONPATH (its bin/, with the
# deepspeed launcher, first on PATH); without requirements.txt, every wheel in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=(preflight kernels step moe attention throughput pretrain memory)
for want in "$@"; do
  [[ " ${STEPS[*]} " == *" $want "* ]] || { echo "gpu_check: no step $want: choose from ${STEPS[*]}" >&2; exit 2; }
done
ARGS=("$@")
wanted() { [ ${#ARGS[@]} -eq 0 ] || [ "$1" = data ] || [[ " ${ARGS[*]} " == *" $1 "* ]]; }  # data: with its users
OUT=${OUT:-./gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  # which wheels of .whl/ this Python needs: those of requirements.txt and, through the bundled wheels' own
  # requirements, of their dependencies, each unless an installed version satisfies it (the machine's own win)
  mapfile -t wheels < <("$PY" - .whl <<'EOF'
import glob, importlib.metadata as md, os, sys, zipfile
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

folder = sys.argv[1]
wheels = {canonicalize_name(parse_wheel_filename(os.path.basename(w))[0]): w for w in glob.glob(f"{folder}/*.whl")}
listed = os.path.join(folder, "requirements.txt")
if not os.path.isfile(listed):  # a folder of wheels alone: all of them
    print(*wheels.values(), sep="\n")
    sys.exit()
todo = [ln.strip() for ln in open(listed) if ln.strip() and not ln.startswith("#")]
need, missing = {}, {}
while todo:  # every requirement is checked (two can ask different versions), a bundled wheel is taken once
    req = Requirement(todo.pop(0))
    name = canonicalize_name(req.name)
    if name in need or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        have = None
    if have is not None and req.specifier.contains(have, prereleases=True):
        continue
    if name not in wheels:
        missing.setdefault((name, have), set()).add(str(req))
        continue
    need[name] = wheels[name]
    with zipfile.ZipFile(wheels[name]) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        todo += [ln.split(":", 1)[1].strip() for ln in z.read(meta).decode().splitlines()
                 if ln.startswith("Requires-Dist:")]
for (name, have), reqs in missing.items():
    print(f"gpu_check: {', '.join(sorted(reqs))} wanted, {f'{name} {have} installed' if have else 'not installed'}, "
          f"and {folder}/ has no wheel of it: install it, or add its wheel to {folder}/ (bench/gpu_wheels.sh carries "
          f"what a Python with torch, triton, numpy and pyyaml lacks)", file=sys.stderr)
print(*need.values(), sep="\n")
EOF
  )
  if [ ${#wheels[@]} -gt 0 ]; then
    echo "gpu_check: installing ${#wheels[@]} wheels from .whl/ into $site: ${wheels[*]##*/}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" \
      && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
  fi
fi

{
  date -u
  git rev-parse HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" - <<'EOF'
import importlib, importlib.metadata as md, sys, warnings
warnings.simplefilter("ignore")  # megatron-core's notes about absent Transformer Engine / Apex
print("python", sys.version.split()[0])
MODULES = {"torch": "torch", "triton": "triton", "liger_kernel": "liger-kernel", "adasplash": "adasplash",
           "numpy": "numpy", "pytest": "pytest", "deepspeed": "deepspeed", "megatron.core": "megatron-core",
           "sentencepiece": "sentencepiece", "transformers": "transformers"}  # module: distribution
for m, dist in MODULES.items():
    try:
        mod = importlib.import_module(m)
        print(m, md.version(dist), "in", mod.__file__.split(f"/{m.split('.')[0]}/")[0])
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
step() {  # step ID NAME SECONDS CMD...: run with a time limit, report, keep going; returns the command's status
  local id=$1 name=$2 limit=$3; shift 3
  if ! wanted "$id"; then return 0; fi
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
  return $rc
}

# the step limits add up to 570 s; with the setup above, about 10 minutes at most
if ! wanted preflight; then :
elif "$PY" -c "import deepspeed" 2>/dev/null; then
  step preflight "preflight" 25 bash -c '"$0" -m pretrain.preflight --ds_config ds_configs/zero3.json \
    --set model=125m --set seq_len=1024 --set micro_batch=1 > "$1/preflight.txt" 2>&1; rc=$?
    cat "$1/preflight.txt"; exit $rc' "$PY" "$OUT"
else
  echo "=== preflight: skipped (it needs deepspeed: bash bench/gpu_wheels.sh first)"
fi
step kernels "kernel parity tests" 100 "$PY" -m pytest -q -p no:cacheprovider tests/ressformer/test_asam_kernel.py \
  tests/ressformer/test_fused_loss.py tests/ressformer/test_moe.py --junitxml="$OUT/pytest.xml"
# modes in turn, each for both presets (the ratios to dense:125m first); reduce-overhead compiles again;
# TORCH_LOGS=perf_hints: why inductor ran a graph without a CUDA graph, if it did
step step "training step: host syncs, eager / compiled / reduce-overhead" 135 env TORCH_LOGS=perf_hints \
  "$PY" bench/train_throughput.py \
  --device cuda --presets 125m dense:125m --seq-len 1024 --batch 1 --steps 6 --warmup 2 --max-seconds 5 \
  --param-dtype bf16 --autocast none \
  --compile eager default reduce-overhead --sync-check --json "$OUT/compiled_step.json"
step moe "moe experts bench" 25 "$PY" bench/moe_experts.py --device cuda --dtype bfloat16 --presets 125m 1b \
  --tokens 16384 --json "$OUT/moe_experts.json"
step attention "attention bench" 75 "$PY" bench/attention.py --device cuda --dtype bfloat16 \
  --seq-lens 1024 2048 4096 8192 16384 32768 65536 --repeats 2 --budget-s 5 --max-total-s 50 \
  --json "$OUT/attention.json"
step throughput "training throughput" 45 "$PY" bench/train_throughput.py --device cuda \
  --presets 1b dense:1b --batch 1 --steps 8 --warmup 2 --max-seconds 8 \
  --json "$OUT/train_throughput.json"  # 125m and dense:125m: the step check's eager rows
prepare=()
if ! wanted pretrain && ! wanted memory; then :
elif ! "$PY" -c "import deepspeed, megatron.core, sentencepiece" 2>/dev/null || ! command -v deepspeed > /dev/null
then
  echo "=== pretrain and memory estimate vs measured: skipped (they need deepspeed, megatron-core and sentencepiece:" \
       "bash bench/gpu_wheels.sh where pip works, or pip install -e '.[train]')"
elif "$PY" -c "import datasets" 2>/dev/null || [ ! -d .whl/artifacts ]; then
  prepare=(bash -c '"$0" -m pretrain.data prepare --out "$1/artifacts" > "$1/prepare.log" 2>&1' "$PY" "$OUT")
else  # tokenizer/ reads the corpus through Hugging Face datasets: without it, the copy gpu_wheels.sh prepared
  prepare=(cp -r .whl/artifacts "$OUT/")
fi
if [ ${#prepare[@]} -gt 0 ] && step data "prepare data" 15 "${prepare[@]}"; then
  # the default split's 0.1 % test part holds ~500 tokens, less than one sample at T >= 1024: no test split
  data=(--set "data.blend=[[1.0, $OUT/artifacts/data/shakespeare]]" --set "data.tokenizer=$OUT/artifacts/tokenizer"
        --set "data.split=949,50,0")
  run=$(mktemp -d)  # checkpoints (about 2 GB) stay out of $OUT
  step pretrain "pretrain 125m, ZeRO-3, 5 steps" 95 bash -c 'log=$1; shift; "$@" > "$log" 2>&1; rc=$?
    tail -n 15 "$log"; exit $rc' _ "$OUT/pretrain_125m.log" deepspeed --num_gpus 1 pretrain/main.py \
    --ds_config ds_configs/zero3.json --config pretrain/configs/debug.yaml --set model=125m --set seq_len=1024 \
    --set micro_batch=1 --set steps=5 --set warmup_steps=1 --set log_every=1 --set eval_every=5 --set eval_iters=2 \
    --set save_every=5 --set wandb.mode=disabled --set run_dir="$run" "${data[@]}"
  cp "$run/metrics.jsonl" "$run/run_info.json" "$OUT/" 2>/dev/null
  rm -rf "$run"
  step memory "memory estimate vs measured" 55 "$PY" bench/memory_check.py --set model=125m \
    --set model.max_seq_len=4096 --set seq_len=4096 --set micro_batch=1 --set model.r2mu.step_sampling=fixed \
    "${data[@]}" --steps 3 --timeout 45 --json "$OUT/memory_check.json"
fi
echo "gpu_check: done, status $status; results in $OUT"
exit $status

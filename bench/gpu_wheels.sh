#!/usr/bin/env bash
# Prepare .whl/ for bench/gpu_check.sh on a GPU machine without network (run here, where pip works):
#   bash bench/gpu_wheels.sh            # then carry the repo with .whl/ to the GPU machine: bash bench/gpu_check.sh
# The GPU image is taken to have Python 3.12, torch with CUDA, triton, numpy, pyyaml and pytest, and none of the
# train / gpu extras. .whl/ gets what the checks need beyond that, as wheels for that interpreter (pure-Python or
# cp312 manylinux x86_64):
#   - deepspeed 0.19.8, built here as a pure-Python wheel with its ops left to JIT (DS_BUILD_OPS=0; nothing the
#     checks run builds one), and its dependencies (hjson, msgpack, ninja, psutil, py-cpuinfo, einops, pydantic and
#     pydantic-core, nvidia-ml-py, ...);
#   - megatron-core 0.16.1 (cp312: its dataset index helpers are compiled);
#   - liger-kernel, adasplash, sentencepiece, safetensors, tqdm;
#   - .whl/requirements.txt: what gpu_check.sh needs; it installs the wheels of these and of their dependencies that
#     the GPU machine lacks (or has at a version these rule out), into a temporary folder;
#   - .whl/artifacts/: the default corpus prepared (`python -m pretrain.data prepare`: tokenizer/, data/shakespeare.*,
#     about 1 MB), which gpu_check.sh uses where Hugging Face datasets is missing (tokenizer/ reads text through it).
# Not carried: torch, triton, numpy, pyyaml (the image's own), wandb (the checks run with wandb.mode=disabled),
# datasets (with pyarrow and pandas ~60 MB; the prepared corpus stands in), transformers (the checks don't use it).
# Environment: PYTHON (default .venv/bin/python, scripts/setup.sh makes it) builds the deepspeed wheel and needs torch
# (a CUDA torch, e.g. PyPI's default wheel, records the CUDA accelerator and its torch / CUDA versions in the wheel;
# the ops are JIT either way); DATA_PYTHON (default .venv/bin/python) prepares the corpus; WHEEL_PYTHON (default
# 3.12) and WHEEL_GLIBC (default 28: glibc 2.28, what torch's own wheels need) select the binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PYVER=${WHEEL_PYTHON:-3.12}
GLIBC=${WHEEL_GLIBC:-28}
platforms=()  # pip takes manylinux tags literally: every glibc up to the machine's, and the legacy aliases
for ((m = GLIBC; m >= 5; m--)); do platforms+=(--platform "manylinux_2_${m}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
DEST=.whl
export PIP_DISABLE_PIP_VERSION_CHECK=1

DATA_PY=${DATA_PYTHON:-.venv/bin/python}
"$PY" -c "import torch" 2>/dev/null || {
  echo "gpu_wheels: $PY cannot import torch, which building the deepspeed wheel needs: run scripts/setup.sh first," \
       "or set PYTHON to a Python that has torch" >&2
  exit 1
}
"$DATA_PY" -c "import datasets, megatron.core, sentencepiece" 2>/dev/null || {
  echo "gpu_wheels: $DATA_PY cannot import datasets, megatron-core and sentencepiece, which preparing the corpus" \
       "needs: run scripts/setup.sh first, or set DATA_PYTHON to a Python of the project's train extra" >&2
  exit 1
}
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [ -n "$exclude" ] && ! grep -qx "/$DEST/" "$exclude" 2>/dev/null; then
  mkdir -p "$(dirname "$exclude")" && echo "/$DEST/" >> "$exclude"
fi

# the versions tested together (the project's pins; the rest as in the dev environment)
PINNED=(megatron-core==0.16.1 liger-kernel==0.8.5 adasplash==0.2.2 sentencepiece==0.2.3 safetensors==0.8.0
        hjson==3.1.0 msgpack==1.2.4 ninja==1.13.2 psutil==7.2.2 py-cpuinfo==9.0.0 einops==0.8.2
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 tqdm==4.70.1 packaging==26.4
        nvidia-ml-py==13.615.71)  # deepspeed built for CUDA asks for it (pynvml: free GPU memory)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# (the grep drops pip's noise about unreachable local index folders; pip's own failure still stops us)
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

echo "gpu_wheels: downloading ${#PINNED[@]} wheels for CPython $PYVER, manylinux x86_64 with glibc 2.$GLIBC"
quiet "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --abi "cp${PYVER/./}" "${platforms[@]}" -d "$tmp/whl" "${PINNED[@]}"
echo "gpu_wheels: building deepspeed 0.19.8 as a pure-Python wheel (DS_BUILD_OPS=0; a minute or more)"
# a CUDA torch (no GPU needed) builds it for the CUDA accelerator, as the GPU machine runs it; a CPU torch records cpu
accel=()
"$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" && accel=(DS_ACCELERATOR=cuda)
env "${accel[@]}" DS_BUILD_OPS=0 "$PY" -m pip wheel --no-cache-dir --no-deps --no-build-isolation -w "$tmp/whl" \
  deepspeed==0.19.8 > "$tmp/build.log" 2>&1 || { grep -v "is ignored: it is neither" "$tmp/build.log" >&2; exit 1; }
compgen -G "$tmp/whl/deepspeed-0.19.8-py3-none-any.whl" > /dev/null || {
  echo "gpu_wheels: the deepspeed build made no pure-Python wheel: $(ls "$tmp/whl" | grep -i deepspeed)" >&2
  exit 1
}
echo "gpu_wheels: preparing the default corpus (python -m pretrain.data prepare)"
"$DATA_PY" -m pretrain.data prepare --out "$tmp/whl/artifacts" > "$tmp/prepare.log" 2>&1 \
  || { cat "$tmp/prepare.log" >&2; exit 1; }
rm -rf "$tmp/whl/artifacts/data/index_cache"  # written by the trainer on the machine that reads it
cat > "$tmp/whl/requirements.txt" <<'EOF'
# bench/gpu_check.sh installs the wheels of these and of their dependencies that the machine lacks
deepspeed==0.19.8
megatron-core==0.16.1
liger-kernel==0.8.5
adasplash==0.2.2
sentencepiece
safetensors
psutil
tqdm
numpy
pyyaml
EOF

mkdir -p "$DEST"
rm -rf "$DEST"/*.whl "$DEST/requirements.txt" "$DEST/artifacts"
mv "$tmp"/whl/* "$DEST"/
ls -l "$DEST"
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels ($(du -ch "$DEST"/*.whl | tail -1 | cut -f1)) and the prepared" \
     "corpus ($(du -sh "$DEST/artifacts" | cut -f1)) in $DEST/: $(du -sh "$DEST" | cut -f1) in all"

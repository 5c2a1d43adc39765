#!/usr/bin/env bash
# GPU benchmarks at Janus-Pro-1B and -7B sizes (random weights, bf16): bench/gpu.py, about 9-10 minutes on one
# H100 or H200, one JSON line per point (also written to $OUT/gpu.jsonl, or bench/gpu-results/ without $OUT).
#
# The GPU machine has Python 3.12, torch 2.11 and transformers 5.17, and no network. The project pins
# transformers 5.24.0 (our sampler uses its cache and mask API) and peft 0.21.2, and ospo_core imports pydantic
# and datasets, which that machine lacks: they travel as wheels (22 MB), built once on a machine with pip's
# network, from the repo root:
#
#   bash bench/gpu.sh wheels            # downloads the pinned cp312 wheels into .whl/ (add /.whl/ to .git/info/exclude)
#
# and then, on the GPU machine, from the repo root, with .whl carried along:
#
#   bash bench/gpu.sh [bench.gpu options]      e.g.  bash bench/gpu.sh --sizes 1b --budget-s 300
#
# The default points (issue 17): the text engine at 64 and 256 chats vs its bandwidth bound, the sampler at 1, 16,
# 64 and 128 images (CUDA graphs at 64 and 128), self-VQA (packed questions, no per-question cache copy), and the
# training step with its MFU (the chunked head log-softmax beside the unchunked one). About 9-10 minutes for both
# sizes; for a 15-minute device budget run one size per call:
#
#   bash bench/gpu.sh --sizes 1b --budget-s 270 && bash bench/gpu.sh --sizes 7b --budget-s 270
#
# The GPU smoke round (a full round through the Prefect flow on a random-weight 1B-shaped checkpoint folder, bf16,
# compile_mode auto; each stage's seconds and share, and the estimate for the same config):
#
#   bash bench/gpu.sh round            # needs the whole project's packages: bash bench/gpu.sh round-wheels first
#
# Without wheels it runs on the machine's own packages and says so; transformers older than 5.24 may then fail.
# torch stays the machine's own (2.11 + CUDA): nothing here replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELHOUSE=${WHEELHOUSE:-.whl}
# The project's pins (pyproject.toml) plus the versions of their own needs that the GPU image lacks or has too old.
WHEELS=(transformers==5.24.0 peft==0.21.2 tokenizers==0.23.3 regex==2026.11.19 datasets==5.2.0 dill==0.4.1
        multiprocess==0.70.19 fsspec==2026.9.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 typing-extensions==4.16.0)

if [[ "${1:-}" == "wheels" ]]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELHOUSE" "${WHEELS[@]}"
  exit 0
fi

if [[ "${1:-}" == "round-wheels" ]]; then
  # Everything the project's virtual environment holds except torch and its CUDA/triton parts (the GPU machine's
  # own), pinned as installed here, for cp312 (tens of MB: check it fits what the device tool carries).
  .venv/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|nvidia-|triton|ospo)' > /tmp/ospo-round-reqs.txt
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$WHEELHOUSE" -r /tmp/ospo-round-reqs.txt
  exit 0
fi

if compgen -G "$WHEELHOUSE/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ospo-site \
    "$WHEELHOUSE"/*.whl
  export PYTHONPATH="/tmp/ospo-site:$PWD"
else
  echo "gpu.sh: no wheels in $WHEELHOUSE (see the top of this file); using the machine's own packages" >&2
  export PYTHONPATH="$PWD"
fi
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 HF_DATASETS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
       TRL_EXPERIMENTAL_SILENCE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, peft; print('gpu.sh: torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
results=${OUT:-bench/gpu-results}
mkdir -p "$results"
if [[ "${1:-}" == "round" ]]; then
  shift
  python3 -m bench.round --size 1b --dtype bf16 "$@" 2>&1 | tee "$results/round.log"
  grep '^{' "$results/round.log" > "$results/round.jsonl" || true
  exit 0
fi
python3 -m bench.gpu "$@" 2>&1 | tee "$results/gpu.log"
grep '^{' "$results/gpu.log" > "$results/gpu.jsonl" || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$results/card.csv" 2>/dev/null || true

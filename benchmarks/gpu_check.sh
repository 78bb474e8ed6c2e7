#!/usr/bin/env bash
# The GPU check in one command (issue 26): samples/s and peak CUDA memory of diffusers' LCM-LoRA script
# against ldmkit lcm_lora and lcd at SD1.5 size, and ldmkit on the quickstart's U-ViT, bf16, random weights,
# one table; under 8 minutes on one H100, no network (benchmarks/gpu_check.py says what each row runs).
#
#   benchmarks/gpu_check.sh [DIFFUSERS] [--steps N] [--out FOLDER]   # on the GPU machine
#   benchmarks/gpu_check.sh [DIFFUSERS] --dry-run                    # CPU, toy size: checks the chain
#
# DIFFUSERS: a diffusers checkout (or its bare git directory) for the peer row; without it the row says so.
# The peer needs torchvision, webdataset and braceexpand: in the same Python, or --peer-python PY.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$here/gpu_check.py" "$@"

#!/usr/bin/env bash
# LoRA on one node of 8 GPUs. Usage: bash launch/single_node_8gpu.sh [CONFIG] [--key value ...]
# `megalora sft` relaunches itself under torchrun because NPROC_PER_NODE is set.
set -euo pipefail
CONFIG="${1:-configs/qwen3_coder_next_lora.yaml}"
shift || true
NPROC_PER_NODE="${NPROC_PER_NODE:-8}" exec megalora sft "$CONFIG" "$@"

#!/usr/bin/env bash
# Set up the environment and run the main job on the embedded tiny default: a
# Qwen3-Next-shaped model and coding chats with tool calls, made locally (no downloads),
# trained with LoRA on 2 CPU ranks with expert parallelism.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
NPROC_PER_NODE="${NPROC_PER_NODE:-2}" exec megalora sft configs/demo.yaml "$@"

#!/usr/bin/env bash
# LoRA across several nodes with torchrun. Run on every node with the same MASTER_ADDR,
# MASTER_PORT and NNODES, and this node's NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/multi_node.sh configs/qwen3_coder_next_lora.yaml
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
CONFIG="${1:?usage: multi_node.sh CONFIG [--key value ...]}"
shift
exec torchrun --nproc_per_node="${NPROC_PER_NODE:-8}" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" -m megalora sft "$CONFIG" "$@"

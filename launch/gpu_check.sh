#!/usr/bin/env bash
# One prepared command that proves the GPU path on one H100/H200 in at most 8 minutes:
#   bash launch/gpu_check.sh [OUT_DIR] [extra bench/gpu_check.py flags]
# It runs bench/gpu_check.py (its docstring lists every check and its bound; the slice sides
# run bench/gpu_slice.py): verify on CUDA for the tiny Qwen3-Next and Qwen3-MoE in fp32 and
# bf16; the GDN kernel (with and without
# cu_seqlens), its causal conv, packed (varlen) attention and torch._grouped_mm against their
# torch references, values and gradients; 20 demo steps on CUDA on 1 rank and on 2 ranks sharing
# the GPU (--distributed_backend gloo) at EP=2 and TP=2+SP against a CPU run; the real-width
# Qwen3-Coder-Next slice (tokens/s, MFU, peak memory vs the planner, transformers + peft ratio).
# Prints one line per check, writes OUT_DIR/summary.json, exits 1 naming the failed checks.
#
# The GPU machine has Python 3.12, torch (2.11 when last seen), transformers, safetensors and
# triton, and no package index. Everything else comes from wheels in .whl/ (gitignored; carried
# to the machine), installed with --no-deps into .gpu-check-site/, put first on PYTHONPATH:
#   megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl  2,612,103 bytes
#   peft-0.21.2-py3-none-any.whl                                                        835,427
#   accelerate-1.16.0-py3-none-any.whl          (peft imports it)                      389,390
#   psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.manylinux_2_28_x86_64.whl  155,560
#   fla_core-0.6.0-py3-none-any.whl             (the GDN kernel library: fla.ops, fla.modules)  1,085,221
#   einops-0.8.2-py3-none-any.whl               (fla imports it)                        65,638
#   jinja2-3.1.6-py3-none-any.whl               (chat templates; optional in transformers)  134,899
#   markupsafe-3.0.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl  22,985
#   megalora-0.1.0-py3-none-any.whl             (this tree, built here)                 205,238
#   total 5,506,461 bytes (5.3 MiB, measured by downloading them), far under the 64 MiB a call carries.
# Fetch them here (a machine with the index), from the repository root:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl \
#       megatron-core==0.16.1 peft==0.21.2 accelerate==1.16.0 psutil==7.2.2 fla-core==0.6.0 einops==0.8.2 \
#       jinja2==3.1.6 markupsafe==3.0.4
#   pip wheel --no-deps --no-build-isolation -w .whl .
# (megatron-core 0.16.1 publishes manylinux_2_28 wheels only, hence the second --platform.)
# Not shipped, on purpose: datasets, wandb, modelscope (nothing on the checked path imports them;
# tests/test_gpu_check.py runs the check with them made unimportable), transformer-engine (not
# used by any code path here), causal-conv1d (compiled; the kernel library's Triton conv is used).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-$ROOT/gpu_check_out}"
shift || true
PY="${PYTHON:-python3}"
if [ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    SITE="$ROOT/.gpu-check-site"
    "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "$ROOT"/.whl/*.whl
    # Every process of the check (verify, sft, torchrun ranks) inherits it.
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# 8 minutes in all: checks not started within 420 s are reported as FAIL (not run), and the
# summary is written after every check, so even the outer timeout leaves what was measured.
exec timeout --signal=TERM 480 "$PY" bench/gpu_check.py --out "$OUT" --budget_s 420 "$@"

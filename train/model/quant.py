"""Quantized HF checkpoints: block-wise FP8 is read exactly, every other scheme is refused.

Block FP8 (`quantization_config: {quant_method: fp8, weight_block_size: [bm, bn]}`, as in
Qwen's -FP8 releases) stores a quantized 2-D weight `W` [out, in] as

    W                float8_e4m3fn [out, in]
    W_scale_inv      float32 (or bf16) [ceil(out / bm), ceil(in / bn)]

and the real weight is `W[i, j] * W_scale_inv[i // bm, j // bn]` (edge blocks may be
partial). A tensor is quantized when its `<name>_scale_inv` companion exists; the
companions themselves are not model tensors. `dequantize_slice` computes the rows/columns
[r0, r1) x [c0, c1) of the real weight from that slice of `W` and only the scale rows and
columns that cover it, so a tensor- or expert-parallel slice that cuts a block needs no
more of the file than its own piece. Values are computed in float32 (the product of an
fp8 value and its scale, as transformers' own dequantization does) and then cast by the
caller to the training dtype.

Anything else under `quantization_config` (NVFP4 / modelopt, AWQ, GPTQ, bitsandbytes,
compressed-tensors, per-tensor FP8, static activation scales, ...) is refused with one
line naming the method: training on silently mis-read weights is worse than stopping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megalora.config import ConfigError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn,)
# A modelopt export keeps its quantization description beside config.json.
MODELOPT_FILE = "hf_quant_config.json"


@dataclass(frozen=True)
class BlockFP8:
    """Block-wise FP8 weights: `block` = (rows, columns) of one scale block."""

    block: tuple[int, int]

    def describe(self) -> str:
        return f"block-FP8 (float8_e4m3fn, {self.block[0]}x{self.block[1]} blocks)"


def _method_name(qc: dict[str, Any]) -> str:
    method = str(qc.get("quant_method") or qc.get("quant_type") or "unknown")
    algo = qc.get("quant_algo") or qc.get("format")
    return f"{method} ({algo})" if algo and str(algo) != method else method


def parse_quantization(cfg: dict[str, Any], *, path: str) -> BlockFP8 | None:
    """The checkpoint's quantization from its config.json dict `cfg` (None: not quantized);
    `ValueError` naming the method for any scheme other than block FP8."""
    qc = cfg.get("quantization_config") or cfg.get("compression_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"{path}: quantization_config must be a mapping, got {type(qc).__name__}")
    method = qc.get("quant_method")
    refuse = (f"{path}: quantization_config quant_method {_method_name(qc)!r} is not supported; megalora reads "
              "unquantized checkpoints and block-wise FP8 (quant_method 'fp8' with weight_block_size) only: "
              "use the model's bf16 release")
    if method != "fp8":
        raise ConfigError(refuse)
    block = qc.get("weight_block_size")
    if block is None:
        raise ConfigError(f"{path}: quantization_config fp8 without weight_block_size (per-tensor FP8) is not "
                          "supported; only block-wise FP8 is: use the model's bf16 release")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConfigError(f"{path}: quantization_config.weight_block_size must be two positive integers, got {block!r}")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ConfigError(f"{path}: quantization_config.activation_scheme {scheme!r} is not supported (only 'dynamic')")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{path}: quantization_config.fmt {qc.get('fmt')!r} is not supported (only 'e4m3')")
    return BlockFP8(block=(block[0], block[1]))


def refuse_modelopt_sidecar(model_dir: str | Path, cfg: dict[str, Any]) -> None:
    """Refuse a modelopt export (NVFP4, ...) that describes itself only in `hf_quant_config.json`."""
    sidecar = Path(model_dir) / MODELOPT_FILE
    if not sidecar.is_file() or cfg.get("quantization_config"):
        return
    try:
        quant = json.loads(sidecar.read_text()).get("quantization") or {}
    except json.JSONDecodeError as err:
        raise ConfigError(f"{sidecar}: invalid JSON ({err.msg})") from None
    raise ConfigError(f"{sidecar}: quantized checkpoint (quant_method 'modelopt', quant_algo "
                      f"{quant.get('quant_algo')!r}) is not supported: use the model's bf16 release")


def read_quantization(model_dir: str | Path) -> BlockFP8 | None:
    """The quantization of the HF folder `model_dir` (None: not quantized), refused unless block FP8."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    refuse_modelopt_sidecar(model_dir, cfg)
    return parse_quantization(cfg, path=str(path))


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the scale grid of a quantized 2-D weight of `shape`."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def scale_range(start: int, stop: int, size: int) -> tuple[int, int]:
    """Scale rows (or columns) [first, last) covering weight indices [start, stop) with blocks of `size`."""
    return start // size, -(-stop // size)


def dequantize_slice(values: Tensor, scales: Tensor, *, block: tuple[int, int], row0: int = 0,
                     col0: int = 0) -> Tensor:
    """float32 weights of the 2-D fp8 slice `values`, whose first element is at (row0, col0)
    of the full tensor; `scales` are the scale rows/columns from `scale_range` of the slice."""
    assert values.dim() == 2 and scales.dim() == 2, (values.shape, scales.shape)
    if values.numel() == 0:
        return values.to(torch.float32)
    rows = torch.arange(row0, row0 + values.shape[0]) // block[0] - row0 // block[0]
    cols = torch.arange(col0, col0 + values.shape[1]) // block[1] - col0 // block[1]
    assert int(rows[-1]) < scales.shape[0] and int(cols[-1]) < scales.shape[1], (values.shape, scales.shape, block)
    return values.to(torch.float32) * scales.to(torch.float32)[rows][:, cols]

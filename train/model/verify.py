"""`megalora verify`: the same tokens through transformers and through our megatron model.

Works in every rank of a torchrun/spawn world: each rank builds its shard and runs the
forward pass, TP logits are gathered, rank 0 loads the transformers model (plus the PEFT
adapter, when given) and compares; every rank returns the same `VerifyResult`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import peft
import torch
import torch.distributed as dist
import transformers
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from torch import Tensor

from megalora.parallel import groups
from megalora.train.model.build import build_model
from megalora.train.model.hf_config import HFModelSpec, read_hf_config

# Turns an adapter folder into one peft reads as meant on this model: (adapter, hf_spec=, work_dir=) -> folder.
PrepareAdapter = Callable[..., Path]

DEFAULT_NUM_TOKENS = 32
# Pass criteria per compute dtype: (largest relative L2 of the logits, least argmax agreement).
# fp32 must agree to rounding; bf16/fp16 round every weight and activation, so a bounded
# error and a few flipped near-ties are what agreement means there (export uses the same).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1.0), torch.bfloat16: (2e-2, 0.9), torch.float16: (5e-3, 0.9)}


@dataclass(frozen=True)
class VerifyResult:
    """Agreement between megatron and transformers logits over the real vocab."""

    rel_l2: float
    max_abs: float
    argmax_agree: float
    tolerance: float
    min_argmax_agree: float = 1.0
    # Low-precision runs only: relative L2 of megatron's and of transformers' logits against
    # transformers in fp32, so that a bf16 gap can be told apart from a bf16 mistake.
    ours_vs_fp32: float | None = None
    reference_vs_fp32: float | None = None

    @property
    def ok(self) -> bool:
        """Relative L2 within tolerance and the same argmax at (at least) the required share of positions."""
        return self.rel_l2 <= self.tolerance and self.argmax_agree >= self.min_argmax_agree

    def summary_line(self) -> str:
        """The line scripts read: `verify: rel_l2=... max_abs=... argmax_agree=... status=ok|FAIL`."""
        status = "ok" if self.ok else "FAIL"
        return (
            f"verify: rel_l2={self.rel_l2:.3e} max_abs={self.max_abs:.3e} "
            f"argmax_agree={self.argmax_agree:.4f} status={status}"
        )

    def fp32_line(self) -> str | None:
        """For low-precision runs: how far each side is from transformers in fp32."""
        if self.ours_vs_fp32 is None:
            return None
        return (f"verify: against transformers fp32: megatron rel_l2={self.ours_vs_fp32:.3e} "
                f"transformers rel_l2={self.reference_vs_fp32:.3e}")


def compare_logits(ours: Tensor, reference: Tensor, *, tolerance: float, min_argmax_agree: float = 1.0) -> VerifyResult:
    """Compare two [batch, seq, vocab] logits tensors (computed in float64)."""
    if ours.shape != reference.shape:
        raise ValueError(f"logits shapes differ: megatron {tuple(ours.shape)} vs transformers {tuple(reference.shape)}")
    a, b = ours.double(), reference.double()
    rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    max_abs = (a - b).abs().max().item()
    agree = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    return VerifyResult(rel_l2=rel, max_abs=max_abs, argmax_agree=agree, tolerance=tolerance,
                        min_argmax_agree=min_argmax_agree)


def default_tokens(
    vocab_size: int, *, num_tokens: int = DEFAULT_NUM_TOKENS, batch_size: int = 1, seed: int = 0
) -> Tensor:
    """Deterministic pseudo-random token ids [batch_size, num_tokens], the same on every rank."""
    if num_tokens < 1 or batch_size < 1:
        raise ValueError(f"seq_length ({num_tokens}) and batch_size ({batch_size}) must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, num_tokens), generator=generator)


def packed_positions(cu_seqlens: Tensor) -> Tensor:
    """Position ids [1, t] that restart at 0 at every packed segment start."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


def megatron_logits(
    model: torch.nn.Module,
    info: Any,
    tokens: Tensor,
    *,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_padded: Tensor | None = None,
) -> Tensor:
    """Forward `tokens` [batch, seq] through this rank's shard; returns the full logits
    [batch, seq, vocab] (TP-gathered, padding columns dropped, fp32 on the CPU) on every rank.
    Inputs go to the model's device.

    With `cu_seqlens` ([N + 1], int) `tokens` is one packed row [1, t] of N sequences;
    `cu_seqlens_padded` gives the segment bounds when each sequence is followed by
    padding tokens (then `cu_seqlens` holds the real lengths)."""

    tp = info.dims.tp
    if info.dims.sequence_parallel and tokens.shape[1] % tp:
        raise ValueError(f"sequence parallel needs a token count divisible by TP={tp}, got {tokens.shape[1]}")
    packed = None
    if cu_seqlens is None:
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    else:
        if tokens.shape[0] != 1:
            raise ValueError(f"packed tokens must be one row [1, t], got {tuple(tokens.shape)}")
        cu_seqlens = cu_seqlens.to(torch.int32)
        bounds = cu_seqlens if cu_seqlens_padded is None else cu_seqlens_padded.to(torch.int32)
        positions = packed_positions(bounds)
        longest = int((bounds[1:] - bounds[:-1]).max())
        packed = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            cu_seqlens_q_padded=None if cu_seqlens_padded is None else bounds,
            cu_seqlens_kv_padded=None if cu_seqlens_padded is None else bounds,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        logits = model(tokens.to(device), positions.to(device), None, packed_seq_params=packed)
        if tp > 1:
            logits = gather_from_tensor_model_parallel_region(logits.contiguous())
    return logits[..., : info.vocab_size].float().cpu()


def transformers_logits(
    model_dir: str | Path,
    tokens: Tensor,
    *,
    num_layers: int | None = None,
    adapter: str | Path | None = None,
    prepare_adapter: PrepareAdapter | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Reference logits (fp32, on the CPU) from transformers run in `dtype` on `device` (with a PEFT
    adapter when given, loaded by peft; `prepare_adapter` first converts an adapter in a layout peft
    misreads on this model, e.g. `vllm`'s: pass `adapter_formats.peft_readable`); `num_layers`
    keeps only the first decoder layers, as `build_model` does. Block-FP8 weights are dequantized
    by transformers at load."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = list(config.layer_types)[:num_layers]
        if getattr(config, "mlp_only_layers", None):
            config.mlp_only_layers = [i for i in config.mlp_only_layers if i < num_layers]
    kwargs: dict[str, Any] = {}
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        # Block FP8 (others are refused before): dequantized weights on any device, never
        # transformers' fp8 GPU kernels, which also quantize activations.
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        kwargs["quantization_config"] = transformers.FineGrainedFP8Config(
            weight_block_size=qc["weight_block_size"], modules_to_not_convert=qc.get("modules_to_not_convert"),
            dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=dtype, **kwargs)
    if adapter is not None:
        spec: HFModelSpec = read_hf_config(model_dir)
        with tempfile.TemporaryDirectory() as work_dir:
            readable = adapter if prepare_adapter is None else prepare_adapter(
                adapter, hf_spec=spec.truncated(num_layers) if num_layers else spec, work_dir=work_dir)
            model = peft.PeftModel.from_pretrained(model, str(readable))
    model.to(device).eval()
    with torch.no_grad():
        return model(tokens.to(device)).logits.float().cpu()


def run_verify(
    model_dir: str | Path,
    *,
    adapter: str | Path | None = None,
    num_layers: int | None = None,
    tokens: Tensor | None = None,
    tp: int = 1,
    ep: int = 1,
    sequence_parallel: bool = False,
    tolerance: float | None = None,
    min_argmax_agree: float | None = None,
    seq_length: int = DEFAULT_NUM_TOKENS,
    batch_size: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    build: Callable[..., tuple[torch.nn.Module, Any]] | None = None,
    prepare_adapter: PrepareAdapter | None = None,
    reference_dir: str | Path | None = None,
    dims: Any = None,
) -> VerifyResult:
    """Build megatron (on `dims`, or TP=`tp`, EP=`ep` initialised here) and transformers models
    from `model_dir`, run the same tokens through both, and compare logits. Call it on every rank
    of the world (or in a single process). Without `tokens`, `default_tokens(seq_length,
    batch_size, seed)` are used. `build(model_dir, dims=, dtype=, num_layers=)` builds the
    megatron side (default `build_model`; with `adapter`, one that loads it into our LoRA
    modules, e.g. `build_lora_model` with `adapter=`); `prepare_adapter` converts an adapter peft
    does not read as written (see `transformers_logits`). Both models run in `dtype`, megatron on
    `dims.device` (`device` when initialised here), transformers there too in bf16/fp16 and on
    the CPU in fp32 (its exact path);
    `tolerance` and `min_argmax_agree` default to `TOLERANCES[dtype]`. `reference_dir` gives
    transformers another folder with the same weights (e.g. a block-FP8 checkpoint dequantized by
    other means, where transformers' own dequantization cannot read its blocks)."""
    if adapter is not None and build is None:
        raise ValueError("adapter given but no build function that loads it into the megatron model")
    if dtype not in TOLERANCES:
        raise ValueError(f"verify runs in {', '.join(str(d) for d in TOLERANCES)}, not {dtype}")
    default_tol, default_agree = TOLERANCES[dtype]
    tolerance = default_tol if tolerance is None else tolerance
    min_argmax_agree = default_agree if min_argmax_agree is None else min_argmax_agree
    if dtype == torch.float32:
        # fp32 verify checks exactness: no TF32 (cuDNN's convolutions default to it on CUDA).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if dims is None:
        dims = groups.initialize(tp=tp, ep=ep, sequence_parallel=sequence_parallel, device=str(device))
    model, info = (build or build_model)(model_dir, dims=dims, dtype=dtype, num_layers=num_layers)
    model.to(dims.device)
    device = dims.device
    if tokens is None:
        tokens = default_tokens(info.vocab_size, num_tokens=seq_length, batch_size=batch_size, seed=seed)
    ours = megatron_logits(model, info, tokens)
    result: list[VerifyResult | None] = [None]
    if dist.get_rank() == 0:
        del model
        # fp32 references run on the CPU: on CUDA transformers sends Qwen3-Next's GDN through the
        # kernel library's Triton kernels, whose fp32 products use TF32; its torch path is exact.
        reference = transformers_logits(reference_dir or model_dir, tokens, num_layers=num_layers, adapter=adapter,
                                        prepare_adapter=prepare_adapter,
                                        dtype=dtype, device="cpu" if dtype == torch.float32 else device)
        result[0] = compare_logits(ours, reference, tolerance=tolerance, min_argmax_agree=min_argmax_agree)
        if dtype != torch.float32:
            truth = transformers_logits(reference_dir or model_dir, tokens, num_layers=num_layers, adapter=adapter,
                                        prepare_adapter=prepare_adapter,
                                        dtype=torch.float32, device="cpu")
            result[0] = dataclasses.replace(result[0], ours_vs_fp32=compare_logits(ours, truth, tolerance=1).rel_l2,
                                            reference_vs_fp32=compare_logits(reference, truth, tolerance=1).rel_l2)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    assert result[0] is not None
    return result[0]

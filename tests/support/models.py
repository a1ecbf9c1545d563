"""Test support for the model tests: block-FP8 checkpoints made from tiny ones, seeded sample
inputs (padded batches, packed rows), the transformers reference computations, and the
`rank_*` functions the multi-process tests spawn (spawned functions must live in an
importable module).

The tiny checkpoints themselves are product code: `megalora.train.model.tiny`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

from megalora.parallel import groups
from megalora.train.model.build import build_model
from megalora.train.model.verify import (compare_logits, default_tokens, megatron_logits, run_verify,
                                         transformers_logits)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Tensors Qwen's -FP8 releases keep unquantized (with every 1-D tensor and conv1d).
FP8_KEPT = ("model.embed_tokens", "lm_head", "mlp.gate", "shared_expert_gate")


def _copy_side_files(src: Path, out: Path) -> None:
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and not path.name.startswith("model.safetensors"):
            (out / path.name).write_bytes(path.read_bytes())


def _block_grid(scales: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """One scale per element of a `shape` weight (edge blocks cropped)."""
    grid = scales.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return grid[: shape[0], : shape[1]]


def make_fp8_checkpoint(src_dir: str | Path, out_dir: str | Path, *, block: tuple[int, int]) -> Path:
    """Quantize the checkpoint in `src_dir` into the on-disk layout of Qwen's -FP8 releases:
    every 2-D projection weight as float8_e4m3fn plus `<name>_scale_inv` (float32, one per
    `block` of [rows, columns], amax / 448, partial edge blocks included), everything else
    (embeddings, LM head, router, shared-expert gate, norms, conv1d, A_log, dt_bias) in
    bfloat16, and config.json with `quantization_config` (quant_method fp8) and dtype bfloat16."""
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(src.glob("*.safetensors")):
        for name, value in load_file(str(path)).items():
            if value.dim() != 2 or "_proj" not in name or any(k in name for k in FP8_KEPT):
                tensors[name] = value.to(torch.bfloat16)
                continue
            rows, cols = -(-value.shape[0] // block[0]), -(-value.shape[1] // block[1])
            padded = value.new_zeros(rows * block[0], cols * block[1])
            padded[: value.shape[0], : value.shape[1]] = value
            amax = padded.reshape(rows, block[0], cols, block[1]).abs().amax(dim=(1, 3))
            scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()
            quantized = (value / _block_grid(scale, tuple(value.shape), block)).clamp(-FP8_MAX, FP8_MAX)
            tensors[name] = quantized.to(torch.float8_e4m3fn)
            tensors[name + "_scale_inv"] = scale
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _copy_side_files(src, out)
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": list(block), "modules_to_not_convert": list(FP8_KEPT)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def dequantized_reference(fp8_dir: str | Path, out_dir: str | Path) -> Path:
    """A plain float32 checkpoint with the real weights of the block-FP8 checkpoint in
    `fp8_dir`, computed from the raw files (whole tensors, scales expanded block by block)
    and without `quantization_config`: the reference transformers loads for verify."""
    src, out = Path(fp8_dir), Path(out_dir)
    out.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    config["dtype"] = "float32"
    raw = load_file(str(src / "model.safetensors"))
    tensors = {}
    for name, value in raw.items():
        if name.endswith("_scale_inv"):
            continue
        scale = raw.get(name + "_scale_inv")
        grid = 1.0 if scale is None else _block_grid(scale, tuple(value.shape), block)  # type: ignore[arg-type]
        tensors[name] = value.float() * grid
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _copy_side_files(src, out)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def sample_tokens(vocab_size: int, *, batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    """Seeded token ids [batch, seq_len] below `vocab_size`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=generator)


def sample_labels(tokens: torch.Tensor) -> torch.Tensor:
    """Next-token labels for `tokens` (the last position predicts the first token)."""
    return torch.roll(tokens, -1, dims=1)


# Three sequences of 5, 7 and 4 tokens packed into one row (16 tokens: TP=2 can split it).
PACKED_CU_SEQLENS = (0, 5, 12, 16)


def packed_sample_tokens(vocab_size: int, *, seed: int = 1) -> torch.Tensor:
    """Seeded token ids [1, 16] holding the sequences delimited by `PACKED_CU_SEQLENS`."""
    return sample_tokens(vocab_size, batch=1, seq_len=PACKED_CU_SEQLENS[-1], seed=seed)


# The same sequences, each padded to an even length (as packing for TP=2 + SP does).
PADDED_CU_SEQLENS = (0, 6, 14, 18)


def real_positions() -> list[int]:
    """Indices of the real (non-padding) tokens in the padded packed row."""
    bounds = zip(PACKED_CU_SEQLENS[:-1], PACKED_CU_SEQLENS[1:], PADDED_CU_SEQLENS[:-1])
    return [start + i for a, b, start in bounds for i in range(b - a)]


def padded_packed_sample(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row [1, 18], cu_seqlens, cu_seqlens_padded): `packed_sample_tokens` with token 0
    padding after each sequence up to `PADDED_CU_SEQLENS`."""
    tokens = packed_sample_tokens(vocab_size)
    row = torch.zeros(1, PADDED_CU_SEQLENS[-1], dtype=tokens.dtype)
    row[:, real_positions()] = tokens
    return row, torch.tensor(PACKED_CU_SEQLENS), torch.tensor(PADDED_CU_SEQLENS)


Layout = tuple[int, int, bool]  # (tp, ep, sequence_parallel)


def rank_forward(
    rank: int,
    world_size: int,
    model_dirs: list[str],
    layouts: list[Layout],
) -> dict[Layout, dict[str, dict[str, Any]]]:
    """Spawn target: for each (tp, ep, sequence_parallel) layout in turn, build every model
    in `model_dirs` on this rank and report, on rank 0, the gathered logits for
    `sample_tokens`, packed and padded-packed rows and the per-token loss; on every rank
    its parameter element counts and the bytes it read from disk. One world serves
    several layouts so tests pay the process start-up once."""
    results: dict[Layout, dict[str, dict[str, Any]]] = {}
    for tp, ep, sequence_parallel in layouts:
        groups.initialize(tp=tp, ep=ep, sequence_parallel=sequence_parallel)
        per_model = {}
        for model_dir in model_dirs:
            model, info = build_model(model_dir)
            logits = megatron_logits(model, info, sample_tokens(info.vocab_size))
            packed = megatron_logits(
                model, info, packed_sample_tokens(info.vocab_size), cu_seqlens=torch.tensor(PACKED_CU_SEQLENS)
            )
            padded_row, real_cu, padded_cu = padded_packed_sample(info.vocab_size)
            packed_padded = megatron_logits(model, info, padded_row, cu_seqlens=real_cu, cu_seqlens_padded=padded_cu)
            tokens = sample_tokens(info.vocab_size)
            positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            with torch.no_grad():
                # Vocab-parallel cross entropy over the padded vocab: padding must not count.
                token_loss = model(tokens, positions, None, labels=sample_labels(tokens))
            assert info.load is not None
            per_model[model_dir] = {
                "logits": logits if rank == 0 else None,
                "token_loss": token_loss if rank == 0 else None,
                "packed_logits": packed if rank == 0 else None,
                "packed_padded_logits": packed_padded[:, real_positions()] if rank == 0 else None,
                "param_numel": {n: p.numel() for n, p in model.named_parameters()},
                "bytes_read": info.load.bytes_read,
                "tp_rank": info.dims.tp_rank,
                "ep_rank": info.dims.ep_rank,
            }
        results[(tp, ep, sequence_parallel)] = per_model
    return results


def reference_logits(model_dir: str | Path) -> torch.Tensor:
    """transformers' fp32 logits for `sample_tokens` on the checkpoint in `model_dir`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    vocab_size = model.config.vocab_size
    with torch.no_grad():
        return model(sample_tokens(vocab_size)).logits


def reference_token_loss(model_dir: str | Path) -> torch.Tensor:
    """transformers' per-token cross entropy [batch, seq] for `sample_tokens` / `sample_labels`."""
    logits = reference_logits(model_dir)
    labels = sample_labels(sample_tokens(logits.shape[-1]))
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")


def reference_packed_logits(model_dir: str | Path) -> torch.Tensor:
    """transformers' logits for `packed_sample_tokens`, each sequence run on its own and
    the results concatenated: [1, 16, vocab]."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    tokens = packed_sample_tokens(model.config.vocab_size)
    bounds = PACKED_CU_SEQLENS
    with torch.no_grad():
        parts = [model(tokens[:, a:b]).logits for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=1)


def rank_verify(rank: int, world_size: int, model_dir: str, num_layers: int, perturb: str) -> dict[str, Any]:
    """Spawn target: `run_verify` with TP=`world_size` and sequence parallel on the first
    `num_layers` layers; then the same check after adding noise to parameter `perturb`
    of the loaded megatron model (on every rank, so every shard of it changes)."""
    clean = run_verify(model_dir, num_layers=num_layers, tp=world_size, sequence_parallel=True)
    model, info = build_model(model_dir, num_layers=num_layers)
    params = dict(model.named_parameters())
    if perturb not in params:
        raise ValueError(f"no parameter {perturb!r}; have {sorted(params)}")
    with torch.no_grad():
        params[perturb].add_(0.05 * torch.randn(params[perturb].shape, generator=torch.Generator().manual_seed(rank)))
    tokens = default_tokens(info.vocab_size)
    ours = megatron_logits(model, info, tokens)
    perturbed = None
    if rank == 0:
        perturbed = compare_logits(ours, transformers_logits(model_dir, tokens, num_layers=num_layers), tolerance=1e-4)
    return {"clean": clean, "perturbed": perturbed}


def rank_verify_layouts(
    rank: int, world_size: int, model_dir: str, reference_dir: str, layouts: list[Layout]
) -> dict[Layout, Any]:
    """Spawn target: `run_verify` of `model_dir` against transformers on `reference_dir`
    for each (tp, ep, sequence_parallel) layout in turn, with the tensors this rank's load
    dequantized (count) and the bytes it read."""
    out: dict[Layout, Any] = {}
    for tp, ep, sequence_parallel in layouts:
        result = run_verify(model_dir, tp=tp, ep=ep, sequence_parallel=sequence_parallel, reference_dir=reference_dir)
        _, info = build_model(model_dir)
        assert info.load is not None
        out[(tp, ep, sequence_parallel)] = {"result": result, "num_dequantized": info.load.num_dequantized,
                                            "bytes_read": info.load.bytes_read}
    return out


def _loss_weights(shape: tuple[int, ...]) -> torch.Tensor:
    # A fixed random linear functional of the logits: every logit gets a gradient.
    return torch.randn(shape, generator=torch.Generator().manual_seed(5))


def rank_gradients(
    rank: int, world_size: int, model_dirs: list[str], variants: dict[str, dict[str, Any]]
) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Spawn target (one rank): for each named variant of TransformerConfig overrides
    (e.g. full recomputation), gradients of every megatron parameter for the loss
    `sum(logits * _loss_weights)` on `sample_tokens`: result[variant][model_dir][name].
    Routed experts are megatron's loop experts here: our grouped experts hold frozen weights."""
    groups.initialize(tp=1, ep=1)
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for variant, overrides in variants.items():
        out[variant] = {}
        for model_dir in model_dirs:
            model, info = build_model(model_dir, experts="sequential", **overrides)
            model.train()
            tokens = sample_tokens(info.vocab_size)
            positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            logits = model(tokens, positions, None)[..., : info.vocab_size]
            (logits * _loss_weights(tuple(logits.shape))).sum().backward()
            out[variant][model_dir] = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out


def reference_gradients(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """transformers' gradients for the loss of `rank_gradients`, named and laid out as
    on disk (fused in-memory expert tensors split into one tensor per expert)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    logits = model(sample_tokens(model.config.vocab_size)).logits
    (logits * _loss_weights(tuple(logits.shape))).sum().backward()
    grads = {}
    for name, param in model.named_parameters():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e, fused in enumerate(param.grad):
                gate, up = fused.chunk(2, dim=0)
                grads[f"{prefix}{e}.gate_proj.weight"] = gate
                grads[f"{prefix}{e}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e, down in enumerate(param.grad):
                grads[f"{prefix}{e}.down_proj.weight"] = down
        else:
            grads[name] = param.grad
    if model.config.tie_word_embeddings:
        grads.pop("lm_head.weight", None)
    return grads


def rank_forward_and_gradients(
    rank: int,
    world_size: int,
    forward_dirs: list[str],
    gradient_dirs: list[str],
    variants: dict[str, dict[str, Any]],
) -> tuple[dict[Layout, dict[str, dict[str, Any]]], dict[str, dict[str, dict[str, torch.Tensor]]]]:
    """Spawn target (one rank): `rank_forward` on `forward_dirs` in the one-rank layout,
    then `rank_gradients` on `gradient_dirs`, so one process start serves both."""
    forward = rank_forward(rank, world_size, forward_dirs, [(1, 1, False)])
    return forward, rank_gradients(rank, world_size, gradient_dirs, variants)

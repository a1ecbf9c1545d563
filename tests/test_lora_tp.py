"""LoRA wrappers under TP=2, with and without sequence parallel, against full-weight math."""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from megalora.parallel.multiprocess import spawn

S, B, IN, OUT, R = 4, 2, 12, 10, 3


def _layer(kind: str, sp: bool) -> torch.nn.Module:
    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, tensor_model_parallel_size=2,
                            sequence_parallel=sp, use_cpu_initialization=True)
    torch.manual_seed(0)  # the same master weight on every rank; each keeps its shard
    init = lambda w: torch.nn.init.normal_(w, std=0.2)  # noqa: E731
    if kind == "column":
        return ColumnParallelLinear(IN, OUT, config=cfg, init_method=init, bias=False,
                                    keep_master_weight_for_test=True)
    return RowParallelLinear(IN, OUT, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                             skip_bias_add=False, keep_master_weight_for_test=True)


def _check_rank(rank: int, world_size: int) -> list[str]:
    from megalora.parallel import groups
    from megalora.train.lora.grads import reduce_lora_grads
    from megalora.train.lora.layers import LoraLinear
    from megalora.train.lora.options import LoraOptions

    checked = []
    for sp in (False, True):
        groups.initialize(tp=2, sequence_parallel=sp)
        for kind in ("column", "row"):
            base = _layer(kind, sp)
            layer = LoraLinear(base, options=LoraOptions(rank=R, alpha=5.0), init_seed=9)
            gen = torch.Generator().manual_seed(1)
            full_a = layer.lora_A.detach().clone() if kind == "column" else None
            full_b = torch.randn(OUT, R, generator=gen)
            x = torch.randn(S, B, IN, generator=gen)
            g = torch.randn(S, B, OUT, generator=gen)
            seq = slice(rank * S // 2, (rank + 1) * S // 2)
            if kind == "column":
                cols = slice(rank * OUT // 2, (rank + 1) * OUT // 2)
                with torch.no_grad():
                    layer.lora_B.copy_(full_b[cols])
                x_in = x[seq] if sp else x
                g_out = g[..., cols]
            else:
                # every rank holds its slice of the full A; rebuild the full one for the reference
                parts = [torch.empty_like(layer.lora_A) for _ in range(2)]
                torch.distributed.all_gather(parts, layer.lora_A.detach().contiguous())
                full_a = torch.cat(parts, dim=1)
                with torch.no_grad():
                    layer.lora_B.copy_(full_b)
                x_in = x[..., rank * IN // 2:(rank + 1) * IN // 2]
                g_out = g[seq] if sp else g
            x_in = x_in.clone().requires_grad_(True)
            out, _ = layer(x_in)
            (out * g_out).sum().backward()
            reduce_lora_grads(layer)

            a = full_a.clone().requires_grad_(True)
            b = full_b.clone().requires_grad_(True)
            xr = x.clone().requires_grad_(True)
            ref = xr @ base.master_weight.T + layer.scaling * (xr @ a.T) @ b.T
            (ref * g).sum().backward()
            if kind == "column":
                torch.testing.assert_close(out, ref[..., cols])  # SP: the base all-gathers the sequence
                torch.testing.assert_close(layer.lora_A.grad, a.grad)
                torch.testing.assert_close(layer.lora_B.grad, b.grad[cols])
                torch.testing.assert_close(x_in.grad, xr.grad[seq] if sp else xr.grad)
            else:
                in_cols = slice(rank * IN // 2, (rank + 1) * IN // 2)
                torch.testing.assert_close(out, ref[seq] if sp else ref)
                torch.testing.assert_close(layer.lora_A.grad, a.grad[:, in_cols])
                torch.testing.assert_close(layer.lora_B.grad, b.grad)
                torch.testing.assert_close(x_in.grad, xr.grad[..., in_cols])
            checked.append(f"{kind}:sp={sp}")
    groups.destroy()
    return checked


def test_tp2_wrappers_match_full_weights_with_and_without_sp() -> None:
    results = spawn(_check_rank, 2, timeout=240)
    assert results == [["column:sp=False", "row:sp=False", "column:sp=True", "row:sp=True"]] * 2

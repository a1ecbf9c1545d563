"""Each redirection of ``megalora.parallel.cpu_runtime``, checked against a plain oracle.

The runtime patches torch and megatron process-wide, so it is exercised in spawned ranks
(which install it) and the oracles are computed here, in the un-patched test process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalora.parallel import cpu_runtime

from support.multiprocess import spawn

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU runtime applies only where CUDA is absent"
)

SEED = 123


def _mask_grad_in_backward(sq: int) -> torch.Tensor:
    """Gradient of an op whose backward builds megatron's causal mask (as recompute does)."""
    from megatron.core.fusions import fused_softmax

    class MaskedInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return grad.masked_fill(fused_softmax.get_default_causal_mask(sq), 0.0)

    x = torch.ones(sq, sq, requires_grad=True)
    MaskedInBackward.apply(x).sum().backward()
    return x.grad


def _recomputed_dropout() -> tuple[torch.Tensor, torch.Tensor]:
    """Output and input grad of dropout under megatron's checkpoint (RNG replayed)."""
    from megatron.core import tensor_parallel

    def block(x: torch.Tensor) -> torch.Tensor:
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return F.dropout(x, p=0.5, training=True)

    x = torch.ones(64, requires_grad=True)
    out = tensor_parallel.checkpoint(block, False, x)
    out.sum().backward()
    return out.detach(), x.grad


def _single_rank_checks() -> dict[str, Any]:
    import megatron.core.transformer.utils as mutils
    from megatron.core import tensor_parallel
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer.moe import moe_utils

    out: dict[str, Any] = {}
    finders = [f for f in sys.meta_path if type(f).__name__ == "_PatchOnImport"]
    out["install_again"] = cpu_runtime.install()
    out["num_finders"] = len([f for f in sys.meta_path if type(f).__name__ == "_PatchOnImport"])
    out["num_finders_before"] = len(finders)
    out["mask_wrapped_once"] = not getattr(
        getattr(fused_softmax.get_default_causal_mask, "__wrapped__", None), "__megalora_cpu__",
        False,
    )
    out["current_device"] = torch.cuda.current_device()
    out["empty_on_current_device"] = torch.empty(2, device=torch.cuda.current_device()).device
    out["tensor_cuda"] = torch.arange(3.0).cuda()
    out["module_cuda"] = torch.nn.Linear(2, 2).cuda().weight.device

    # RNG: "CUDA" seeding, state get/set and megatron's tracker act on the CPU generator.
    torch.cuda.manual_seed(SEED)
    out["after_cuda_seed"] = torch.rand(4)
    state = torch.cuda.get_rng_state()
    first = torch.rand(4)
    torch.cuda.set_rng_state(state)
    out["replayed"] = (first, torch.rand(4))
    torch.manual_seed(SEED)
    tensor_parallel.model_parallel_cuda_manual_seed(SEED, tp_rank=1, ep_rank=0, etp_rank=0)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        out["tp_fork_draw"] = torch.rand(4)
    out["after_fork_draw"] = torch.rand(4)
    out["dropout_out"], out["dropout_grad"] = _recomputed_dropout()

    # Streams and events: the alltoall dispatcher's D2H pattern runs.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = torch.arange(4.0) * 2
    event = side.record_event()
    event.synchronize()
    torch.cuda.synchronize()
    out["stream_result"] = y
    out["event_done"] = torch.cuda.Event().query()

    # device="cuda" literals, also when the mask is built inside a backward pass.
    out["causal_mask"] = mutils.get_default_causal_mask(5)
    out["sliding_mask"] = fused_softmax.get_sliding_window_causal_mask(4, 6, (2, 0))
    out["mask_grad_in_backward"] = _mask_grad_in_backward(4)

    # megatron's jit_fuser (torch.compile) is the identity: its fused helpers stay Python.
    from megatron.core.fusions import fused_bias_swiglu

    out["swiglu_is_python"] = type(fused_bias_swiglu.swiglu).__name__ == "function" and not hasattr(
        fused_bias_swiglu.swiglu, "_torchdynamo_orig_callable"
    )
    x = torch.randn(3, 8)
    out["swiglu"] = (x, fused_bias_swiglu.swiglu(x))

    # Transformer Engine absent: the router gating linear runs the torch path.
    inp, weight = torch.randn(3, 8), torch.randn(4, 8)
    out["te_general_gemm"] = moe_utils.te_general_gemm
    out["router_gating"] = (inp, weight, moe_utils.router_gating_linear(inp, weight, None,
                                                                         torch.float32))
    return out


def _probe(rank: int, world_size: int) -> dict[str, Any]:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.tensor_parallel.mappings import (
        gather_from_sequence_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )
    from megatron.core.transformer.moe import moe_utils

    from megalora.parallel import groups

    out = _single_rank_checks() if rank == 0 else {}
    groups.initialize(tp=2)
    tp_group = parallel_state.get_tensor_model_parallel_group()

    # gloo all_to_all_single with numpy split sizes (rank r sends r+1 rows to each rank).
    send = torch.full((2 * (rank + 1),), float(rank))
    recv = torch.empty(3)
    in_splits = np.array([rank + 1, rank + 1])
    dist.all_to_all_single(recv, send, np.array([1, 2]), in_splits)
    out["all_to_all"] = recv

    # Uneven all-gather and its reduce-scatter backward, through megatron's mapping.
    sizes = [1, 3]
    x = torch.full((sizes[rank], 2), float(rank + 1), requires_grad=True)
    gathered = gather_from_sequence_parallel_region(x, group=tp_group, output_split_sizes=sizes)
    weight = torch.arange(8.0).view(4, 2)
    (gathered * weight).sum().backward()
    out["uneven_gather"] = gathered.detach()
    out["uneven_gather_grad"] = x.grad
    full = torch.arange(8.0).view(4, 2) * (rank + 1)
    out["uneven_reduce_scatter"] = reduce_scatter_to_sequence_parallel_region(
        full, group=tp_group, input_split_sizes=sizes
    )

    # The TP data broadcast and the MoE metric tracker (device="cuda" literals inside).
    data = {"tokens": torch.arange(6).view(2, 3)} if rank == 0 else {}
    out["broadcast"] = tensor_parallel.broadcast_data(["tokens"], data, torch.int64)["tokens"]
    totals: dict[str, torch.Tensor] = {}
    moe_utils.track_moe_metrics(1.0, 1, total_loss_dict=totals, force_initialize=True,
                                track_names=["load_balancing_loss"], num_layers=2)
    out["moe_metrics"] = totals["load_balancing_loss"]
    groups.destroy()
    return out


@pytest.fixture(scope="module")
def probed() -> list[dict[str, Any]]:
    return spawn(_probe, 2, timeout=300)


def test_install_is_idempotent(probed: list[dict[str, Any]]) -> None:
    r = probed[0]
    assert r["install_again"] is True
    assert r["num_finders_before"] == r["num_finders"] == 1
    assert r["mask_wrapped_once"]


def test_install_is_a_no_op_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_runtime, "_installed", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current_device = torch.cuda.current_device
    meta_path = list(sys.meta_path)
    assert cpu_runtime.install() is False
    assert torch.cuda.current_device is current_device
    assert sys.meta_path == meta_path
    assert cpu_runtime.is_active() is False


def test_current_device_and_cuda_calls_are_cpu(probed: list[dict[str, Any]]) -> None:
    r = probed[0]
    assert r["current_device"] == torch.device("cpu")
    assert r["empty_on_current_device"] == torch.device("cpu")
    assert r["tensor_cuda"].device == torch.device("cpu")
    torch.testing.assert_close(r["tensor_cuda"], torch.arange(3.0))
    assert r["module_cuda"] == torch.device("cpu")


def test_cuda_rng_is_the_cpu_generator(probed: list[dict[str, Any]]) -> None:
    r = probed[0]
    gen = torch.Generator().manual_seed(SEED)
    torch.testing.assert_close(r["after_cuda_seed"], torch.rand(4, generator=gen))
    torch.testing.assert_close(*r["replayed"])
    # megatron's tensor-parallel stream: seed + 2718 + tp_rank; the default stream resumes.
    tp_gen = torch.Generator().manual_seed(SEED + 2718 + 1)
    torch.testing.assert_close(r["tp_fork_draw"], torch.rand(4, generator=tp_gen))
    assert not torch.equal(r["tp_fork_draw"], r["after_fork_draw"])


def test_recompute_replays_the_dropout_mask(probed: list[dict[str, Any]]) -> None:
    out, grad = probed[0]["dropout_out"], probed[0]["dropout_grad"]
    kept = out != 0
    assert 0 < kept.sum() < out.numel()
    # Replayed RNG: the backward mask (grad = 2 where kept) is the forward mask.
    torch.testing.assert_close(grad, kept.float() * 2.0)


def test_streams_and_events_run_synchronously(probed: list[dict[str, Any]]) -> None:
    torch.testing.assert_close(probed[0]["stream_result"], torch.arange(4.0) * 2)
    assert probed[0]["event_done"] is True


def test_cuda_literal_masks_on_cpu_also_in_backward(probed: list[dict[str, Any]]) -> None:
    r = probed[0]
    torch.testing.assert_close(r["causal_mask"], torch.ones(5, 5).triu(1).bool())
    m = torch.ones(4, 6, dtype=torch.bool)
    expected = ~torch.tril(torch.triu(m, diagonal=6 - 4 - 2), diagonal=6 - 4 + 0)
    torch.testing.assert_close(r["sliding_mask"], expected)
    torch.testing.assert_close(r["mask_grad_in_backward"], torch.ones(4, 4).tril())


def test_jit_fuser_does_not_compile(probed: list[dict[str, Any]]) -> None:
    assert probed[0]["swiglu_is_python"]
    x, got = probed[0]["swiglu"]
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(got, F.silu(gate) * up)


def test_helpers_decorated_before_install_do_not_compile() -> None:
    """Our modules import megatron at their top, before `groups.initialize` installs the runtime:
    the jit_fuser helpers megatron decorated then must still run without compiling."""
    code = (
        "import torch, megatron.core.activations as act\n"
        "from megalora.parallel import cpu_runtime\n"
        "cpu_runtime.install()\n"
        "from torch._dynamo.utils import counters\n"
        "x = torch.randn(4, 8)\n"
        "torch.testing.assert_close(act.squared_relu(x), torch.relu(x) ** 2)\n"
        "print('frames', sum(counters['frames'].values()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "frames 0", out.stdout


def test_router_gating_without_transformer_engine(probed: list[dict[str, Any]]) -> None:
    assert probed[0]["te_general_gemm"] is None
    inp, weight, got = probed[0]["router_gating"]
    torch.testing.assert_close(got, inp @ weight.t())


def test_all_to_all_single_takes_numpy_splits(probed: list[dict[str, Any]]) -> None:
    # rank 0 receives 1 row from rank 0 and 2 from rank 1; rank 1 receives 1 and 2 too.
    for rank in range(2):
        torch.testing.assert_close(probed[rank]["all_to_all"], torch.tensor([0.0, 1.0, 1.0]))


def test_uneven_all_gather_and_reduce_scatter(probed: list[dict[str, Any]]) -> None:
    expected = torch.cat([torch.full((1, 2), 1.0), torch.full((3, 2), 2.0)])
    weight = torch.arange(8.0).view(4, 2)
    for rank in range(2):
        torch.testing.assert_close(probed[rank]["uneven_gather"], expected)
        rows = slice(0, 1) if rank == 0 else slice(1, 4)
        # backward: reduce-scatter of identical grads from two ranks = 2 * weight rows
        torch.testing.assert_close(probed[rank]["uneven_gather_grad"], 2 * weight[rows])
        full_sum = torch.arange(8.0).view(4, 2) * (1 + 2)
        torch.testing.assert_close(probed[rank]["uneven_reduce_scatter"], full_sum[rows])


def test_tp_broadcast_and_moe_metrics_on_cpu(probed: list[dict[str, Any]]) -> None:
    for rank in range(2):
        torch.testing.assert_close(probed[rank]["broadcast"], torch.arange(6).view(2, 3))
        metrics = probed[rank]["moe_metrics"]
        assert metrics.device == torch.device("cpu")
        torch.testing.assert_close(metrics, torch.tensor(0.0))


def test_unknown_megatron_core_version_is_refused_by_name(monkeypatch):
    from megalora.parallel import cpu_runtime

    monkeypatch.delenv(cpu_runtime.ALLOW_ENV, raising=False)
    assert cpu_runtime.check_megatron_core_version().startswith("0.16.")  # the installed one passes
    with pytest.raises(ImportError, match=r"installed megatron-core 0\.17\.0.*megatron-core==0\.16\.1"):
        cpu_runtime.check_megatron_core_version("0.17.0")
    monkeypatch.setenv(cpu_runtime.ALLOW_ENV, "1")
    assert cpu_runtime.check_megatron_core_version("0.17.0") == "0.17.0"

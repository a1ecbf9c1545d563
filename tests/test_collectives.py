"""Where the collectives' tensors live: the default group's backends on a GPU machine, and
every collective of real training steps checked against the plan in train/step.py.

NCCL refuses CPU tensors. A GPU run therefore needs a default group that also has a CPU
backend (`cpu:gloo,cuda:nccl`), and the step must keep its bookkeeping on the CPU and its
model tensors on the model's device. The second test records, on 4 gloo ranks (TP=2+SP x
EP=2, so DP=2), each collective's calling site, tensor device and dtype over two training
steps with an eval and a checkpoint, and fails on any collective the plan does not list.
"""
import datetime
import sys

import pytest
import torch

from support.multiprocess import spawn


def test_cuda_machine_gets_a_cpu_and_a_cuda_backend(monkeypatch):
    from megalora.parallel import groups

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(groups.dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")

    thirty = datetime.timedelta(minutes=30)
    for backend in ("auto", "nccl"):
        calls.clear()
        groups._init_default_group(backend)
        assert calls == [("set_device", 1), ("init", {"backend": "cpu:gloo,cuda:nccl", "timeout": thirty})]
    # gloo lets four ranks share the machine's two GPUs; the collective timeout is a key.
    calls.clear()
    groups._init_default_group("gloo", timeout_minutes=2.5)
    assert calls == [("set_device", 1), ("init", {"backend": "gloo", "timeout": datetime.timedelta(minutes=2.5)})]


def test_cpu_machine_gets_gloo_and_refuses_nccl(monkeypatch):
    from megalora.parallel import groups

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert groups.default_group_backend("auto", cuda=False) == "gloo"
    assert groups.default_group_backend("gloo", cuda=False) == "gloo"
    with pytest.raises(ValueError, match="distributed_backend=nccl needs CUDA"):
        groups.default_group_backend("nccl", cuda=False)
    with pytest.raises(ValueError, match="distributed_backend='mpi'"):
        groups.default_group_backend("mpi", cuda=True)


# (module, function) of the innermost megalora/megatron frame -> (device, dtypes); "model" is the
# device of the model's parameters, None any dtype. The documented plan of train/step.py.
PLAN = {
    ("megalora.train.step", "dp_all_reduce"): ("cpu", {torch.float64}),
    ("megalora.train.step", "lora_grad_norm"): ("cpu", {torch.float64}),
    ("megalora.train.signals", "should_stop"): ("cpu", {torch.int32}),
    ("megalora.train.lora.grads", "_all_reduce_grads"): ("model", {torch.float32}),
    # torch serialises objects into tensors on the group's object device: the CPU when the
    # group has a CPU backend.
    ("megalora.train.lora.layout", "gather_full_lora"): ("cpu", {"object"}),
    # Every rank's view of a failed save or run-folder write (one line on every rank, no hang).
    ("megalora.train.checkpoint", "first_error"): ("cpu", {"object"}),
}
MUST_SEE = {("megalora.train.step", "dp_all_reduce"), ("megalora.train.step", "lora_grad_norm"),
            ("megalora.train.signals", "should_stop"), ("megalora.train.lora.grads", "_all_reduce_grads"),
            ("megalora.train.lora.layout", "gather_full_lora")}
_OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter_tensor",
        "_reduce_scatter_base", "all_to_all_single", "all_to_all", "broadcast", "gather", "scatter",
        "reduce_scatter", "reduce")
_OBJECT_OPS = ("gather_object", "all_gather_object", "broadcast_object_list", "scatter_object_list")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _site():
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if (module.startswith(("megalora.", "megatron.")) and module != "megalora.parallel.cpu_runtime"):
            return module, frame.f_code.co_name
        frame = frame.f_back
    return "?", "?"


def _record_training(rank, world_size, flags):
    """Spawn target: train with every collective recorded as (site, op, device, dtype)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    seen = set()

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            for t in _tensors(list(args) + list(kwargs.values())):
                seen.add((_site(), name, t.device.type, t.dtype))
            return fn(*args, **kwargs)
        return recorded

    def wrap_object(name, fn):
        def recorded(*args, group=None, **kwargs):
            device = dist.distributed_c10d._get_object_coll_device(group)
            seen.add((_site(), name, device, "object"))
            return fn(*args, group=group, **kwargs)
        return recorded

    for name in _OPS:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))
    for name in _OBJECT_OPS:
        setattr(dist, name, wrap_object(name, getattr(dist, name)))
    # megatron binds its gather / reduce-scatter functions at import time.
    mappings.dist_all_gather_func = wrap("all_gather_into_tensor", mappings.dist_all_gather_func)
    mappings.dist_reduce_scatter_func = wrap("reduce_scatter_tensor", mappings.dist_reduce_scatter_func)

    from megalora.config import load_config
    from megalora.train.recipe import train

    cfg, extras = load_config(None, flags)
    assert train(cfg, extras) == 0
    return sorted((site, op, dev, str(dtype)) for site, op, dev, dtype in seen)


def test_one_training_step_follows_the_collective_plan(train_assets, tmp_path):
    flags = ["--model", str(train_assets.model_dir), "--dataset", f"{train_assets.data_file}#24",
             "--split_dataset_ratio", "0.25", "--max_length", "256", "--global_batch_size", "4",
             "--train_iters", "2", "--eval_interval", "2", "--eval_iters", "1", "--save", str(tmp_path / "run"),
             "--save_interval", "2", "--lora_rank", "4", "--target_modules", "all-linear",
             "--torch_dtype", "float32", "--tensor_model_parallel_size", "2", "--sequence_parallel", "true",
             "--expert_model_parallel_size", "2"]
    per_rank = spawn(_record_training, 4, args=(flags,), timeout=900)
    model_device = "cpu"  # the device the ranks' models live on in this test
    seen_sites = set()
    for rank, records in enumerate(per_rank):
        assert records, f"rank {rank} recorded no collective"
        for (module, function), op, device, dtype in records:
            site = (module, function)
            if module.startswith("megatron."):
                assert device == model_device, (rank, site, op, device)
                seen_sites.add(("megatron", ""))
                continue
            assert site in PLAN, f"rank {rank}: {op} from {module}.{function} is not in the plan of train/step.py"
            want_device, want_dtypes = PLAN[site]
            assert device == (model_device if want_device == "model" else want_device), (rank, site, op, device)
            assert dtype in {str(d) for d in want_dtypes}, (rank, site, op, dtype)
            seen_sites.add(site)
    # Every planned site ran, and megatron's own model-tensor collectives (TP/SP, EP) were seen.
    assert MUST_SEE | {("megatron", "")} <= seen_sites, MUST_SEE - seen_sites

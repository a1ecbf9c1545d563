"""Make megatron-core's real modules run on CPU (gloo), when and only when CUDA is absent.

megatron-core 0.16.1 assumes a GPU in a handful of places on the model, MoE dispatcher,
rotary and recompute paths. ``install()`` redirects each of them to the CPU; every
redirection below has its own test (``tests/test_cpu_runtime.py``).

What changes (only when ``torch.cuda.is_available()`` is false):

- ``torch.cuda.current_device()`` returns ``torch.device("cpu")`` (megatron passes it as
  ``device=`` when it allocates parameters and buffers).
- ``Tensor.cuda()`` returns the tensor on the CPU.
- The "CUDA" random generator is the CPU default generator: ``torch.cuda.get_rng_state``,
  ``set_rng_state`` and ``manual_seed`` act on it, and so do megatron's own
  ``_get_cuda_rng_state``/``_set_cuda_rng_state``. So ``model_parallel_cuda_manual_seed``,
  ``get_cuda_rng_tracker().fork()`` and the RNG replay of recomputation all work on the
  CPU generator, with megatron's usual per-rank seeds.
- ``torch.cuda.Stream``/``Event``/``current_stream``/``stream``/``synchronize`` become
  host stand-ins that do nothing: CPU kernels run synchronously, so every "wait" holds.
- megatron functions with ``device="cuda"`` literals (causal masks, MoE metric tracker,
  TP data broadcast) run with those literals read as CPU. The functions themselves are
  wrapped, so this also holds when they run during recomputation in the backward pass.
- gloo: ``all_to_all_single`` accepts numpy split sizes; ``all_gather`` accepts outputs of
  unequal sizes and ``reduce_scatter`` inputs of unequal sizes (megatron gathers uneven
  token chunks across TP with the alltoall dispatcher under SP).
- ``megatron.core.transformer.moe.moe_utils.te_general_gemm`` is defined (as ``None``)
  when Transformer Engine is absent; 0.16.1 reads it unconditionally.
- megatron's ``jit_fuser`` (``torch.compile`` in 0.16.1, for a few small elementwise
  helpers) is the identity: on CPU, compiling needs a C++ toolchain and costs seconds
  per process for nothing. Modules imported after ``install()`` get the identity; helpers
  decorated before it (our modules import megatron at their top, often before any
  ``install()``) keep their ``torch.compile`` wrapper, so ``torch.compile`` itself is
  switched off (``torch._dynamo.config.disable``): the wrapped helpers run eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import logging
import os
import sys
from importlib import metadata
from types import ModuleType
from typing import Any, Callable, Iterator

import torch
import torch._dynamo
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

# megatron functions that build tensors with device="cuda" literals, per module.
_CUDA_LITERAL_FUNCTIONS = {
    "megatron.core.transformer.utils": (
        "get_default_causal_mask",
        "get_sliding_window_causal_mask",
    ),
    "megatron.core.fusions.fused_softmax": (
        "get_default_causal_mask",
        "get_sliding_window_causal_mask",
    ),
    "megatron.core.transformer.moe.moe_utils": ("track_moe_metrics",),
    "megatron.core.tensor_parallel.data": ("_build_key_size_numel_dictionaries",),
}

_installed = False

# The megatron-core releases whose private names this module was written against and
# tested with; any other version is refused before anything is patched.
SUPPORTED_MEGATRON_CORE = ("0.16.",)
ALLOW_ENV = "MEGALORA_ALLOW_MEGATRON_CORE"


def check_megatron_core_version(version: str | None = None) -> str:
    """The installed megatron-core version, or a clear error if the CPU runtime does not know it.

    Setting ``MEGALORA_ALLOW_MEGATRON_CORE=1`` proceeds anyway (each redirection still has
    its test in ``tests/test_cpu_runtime.py``, the way to find out what broke)."""
    if version is None:
        try:
            version = metadata.version("megatron-core")
        except metadata.PackageNotFoundError:
            raise ImportError("megatron-core is not installed; megalora needs megatron-core==0.16.1") from None
    if version.startswith(SUPPORTED_MEGATRON_CORE) or os.environ.get(ALLOW_ENV) == "1":
        return version
    raise ImportError(
        f"megalora's CPU runtime patches private parts of megatron-core {', '.join(v + 'x' for v in SUPPORTED_MEGATRON_CORE)}"
        f" and was not tested with the installed megatron-core {version}: install megatron-core==0.16.1, "
        f"or set {ALLOW_ENV}=1 to try anyway")


def is_active() -> bool:
    """True when the runtime applies here (no CUDA) and ``install()`` has run."""
    return _installed


def install() -> bool:
    """Install the CPU redirections once; no-op when CUDA is available.

    Returns whether the runtime is active. Safe to call any number of times.
    """
    global _installed
    if _installed:
        return True
    if torch.cuda.is_available():
        return False
    check_megatron_core_version()
    _patch_device()
    _patch_torch_rng()
    _patch_streams()
    _patch_gloo_collectives()
    # Whatever was decorated with megatron's jit_fuser before this call runs eagerly.
    torch._dynamo.config.disable = True
    # megatron's own modules are patched when they are imported (now, if they already
    # are): a process that never imports megatron does not pay for importing it.
    hooks = _megatron_hooks()
    finder = _PatchOnImport(hooks)
    for name in hooks:
        if name in sys.modules:
            finder.patch(sys.modules[name])
    sys.meta_path.insert(0, finder)
    _installed = True
    return True


def _megatron_hooks() -> dict[str, list[Callable[[ModuleType], None]]]:
    hooks: dict[str, list[Callable[[ModuleType], None]]] = {
        name: [functools.partial(_wrap_cuda_literals, names=names)]
        for name, names in _CUDA_LITERAL_FUNCTIONS.items()
    }
    hooks.setdefault("megatron.core.tensor_parallel.random", []).append(_patch_megatron_rng)
    hooks["megatron.core.transformer.moe.moe_utils"].append(_patch_moe_utils)
    hooks["megatron.core.jit"] = [_disable_jit_fuser]
    return hooks


class _PatchLoader(importlib.abc.Loader):
    """Runs the real loader, then the patches for that module."""

    def __init__(self, loader: Any, patch: Callable[[ModuleType], None]) -> None:
        self.loader = loader
        self.patch = patch

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, name: str) -> Any:
        # get_source, get_filename, is_package, ...: tracebacks and inspect still work.
        return getattr(self.loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Import hook: patch the listed megatron modules right after they execute."""

    def __init__(self, hooks: dict[str, list[Callable[[ModuleType], None]]]) -> None:
        self.hooks = hooks

    def patch(self, module: ModuleType) -> None:
        for hook in self.hooks[module.__name__]:
            hook(module)

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in self.hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _PatchLoader(spec.loader, self.patch)
                return spec
        return None


# --- devices -----------------------------------------------------------------------------


def _patch_device() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")

    def tensor_cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False,
                    **kwargs: Any) -> torch.Tensor:
        return self.to("cpu", non_blocking=non_blocking)

    torch.Tensor.cuda = tensor_cuda


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, str):
        return value.split(":")[0] == "cuda"
    return isinstance(value, torch.device) and value.type == "cuda"


class _CudaLiteralsToCpu(TorchFunctionMode):
    """Reads ``device="cuda"`` (keyword, or a ``Tensor.to`` target) as the CPU."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


def _run_on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # The mode is entered by the call itself, so it holds wherever the call happens,
        # including recomputation inside the backward pass.
        with _CudaLiteralsToCpu():
            return fn(*args, **kwargs)

    wrapper.__megalora_cpu__ = True  # type: ignore[attr-defined]
    return wrapper


def _wrap_cuda_literals(module: ModuleType, *, names: tuple[str, ...]) -> None:
    for name in names:
        fn = getattr(module, name)
        if not getattr(fn, "__megalora_cpu__", False):
            setattr(module, name, _run_on_cpu(fn))


# --- random number generators ----------------------------------------------------------


class _SameGeneratorFilter(logging.Filter):
    """Drop megatron's warning that the CPU RNG moved inside a CUDA RNG fork.

    Here the CUDA generator *is* the CPU generator, so every draw inside a fork (dropout,
    weight init) moves it; the warning would fire on every fork and mean nothing.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _get_rng_state(device: Any = "cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = "cuda", **kwargs: Any) -> None:
    torch.default_generator.set_state(new_state)


def _patch_torch_rng() -> None:
    gen = torch.default_generator

    def manual_seed(seed: int) -> None:
        # Not torch.manual_seed: that one calls torch.cuda.manual_seed_all itself.
        gen.manual_seed(int(seed))

    torch.cuda.get_rng_state = _get_rng_state
    torch.cuda.random.get_rng_state = _get_rng_state
    torch.cuda.set_rng_state = _set_rng_state
    torch.cuda.random.set_rng_state = _set_rng_state
    torch.cuda.manual_seed = manual_seed
    torch.cuda.random.manual_seed = manual_seed


def _patch_megatron_rng(mrandom: ModuleType) -> None:
    def get_cuda_rng_state(device: Any = "cuda", clone: bool = False,
                           graph_safe: bool = False) -> torch.Tensor:
        return torch.default_generator.get_state()

    mrandom._get_cuda_rng_state = get_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_rng_state
    logging.getLogger(mrandom.__name__).addFilter(_SameGeneratorFilter())


# --- streams and events ------------------------------------------------------------------


class HostEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is already complete when recorded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class HostStream:
    """Stand-in for ``torch.cuda.Stream``: one synchronous host queue."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: HostEvent | None = None) -> HostEvent:
        return event if event is not None else HostEvent()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


_DEFAULT_STREAM = HostStream()


@contextlib.contextmanager
def _stream_context(stream: Any = None) -> Iterator[None]:
    yield


def _patch_streams() -> None:
    torch.cuda.Stream = HostStream
    torch.cuda.Event = HostEvent
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.stream = _stream_context
    torch.cuda.synchronize = lambda device=None: None


# --- gloo collectives --------------------------------------------------------------------


def _is_gloo(group: Any) -> bool:
    return dist.get_backend(group) == "gloo"


def _as_int_list(splits: Any) -> Any:
    if splits is None or isinstance(splits, list):
        return splits
    return [int(s) for s in splits]


def _patch_gloo_collectives() -> None:
    all_to_all_single = dist.all_to_all_single
    all_gather = dist.all_gather
    reduce_scatter = dist.reduce_scatter

    @functools.wraps(all_to_all_single)
    def all_to_all_single_int_splits(output: torch.Tensor, input: torch.Tensor,
                                     output_split_sizes: Any = None,
                                     input_split_sizes: Any = None, *args: Any,
                                     **kwargs: Any) -> Any:
        # The alltoall dispatcher passes numpy arrays; gloo's binding takes only lists.
        return all_to_all_single(output, input, _as_int_list(output_split_sizes),
                                 _as_int_list(input_split_sizes), *args, **kwargs)

    @functools.wraps(all_gather)
    def all_gather_uneven(tensor_list: list[torch.Tensor], tensor: torch.Tensor,
                          group: Any = None, async_op: bool = False) -> Any:
        sizes = {t.numel() for t in tensor_list}
        if async_op or len(sizes) == 1 or not _is_gloo(group):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        return _uneven_all_gather(tensor_list, tensor, group)

    @functools.wraps(reduce_scatter)
    def reduce_scatter_uneven(output: torch.Tensor, input_list: list[torch.Tensor],
                              op: Any = dist.ReduceOp.SUM, group: Any = None,
                              async_op: bool = False) -> Any:
        if async_op or not _is_gloo(group):
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        return _reduce_scatter_by_all_reduce(output, input_list, op, group)

    dist.all_to_all_single = all_to_all_single_int_splits
    dist.all_gather = all_gather_uneven
    dist.reduce_scatter = reduce_scatter_uneven


def _uneven_all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor,
                       group: Any) -> None:
    """All-gather tensors of unequal sizes by padding each to the largest and trimming."""
    rank = dist.get_rank(group)
    if tensor.numel() != tensor_list[rank].numel():
        raise ValueError(
            f"all_gather: this rank sends {tensor.numel()} elements but its output slot "
            f"{rank} holds {tensor_list[rank].numel()}"
        )
    max_numel = max(t.numel() for t in tensor_list)
    padded = tensor.new_zeros(max_numel)
    padded[: tensor.numel()] = tensor.reshape(-1)
    gathered = [tensor.new_empty(max_numel) for _ in tensor_list]
    dist.all_gather(gathered, padded, group=group)
    for out, buf in zip(tensor_list, gathered):
        out.copy_(buf[: out.numel()].view(out.shape))


def _reduce_scatter_by_all_reduce(output: torch.Tensor, input_list: list[torch.Tensor],
                                  op: Any, group: Any) -> None:
    """Reduce-scatter (any sizes) as an all-reduce of the whole input, keeping our chunk.

    gloo has no (uneven) reduce-scatter; every rank holds the same list of chunk sizes, so
    reducing the concatenation and slicing gives each rank its reduced chunk.
    """
    rank = dist.get_rank(group)
    if output.numel() != input_list[rank].numel():
        raise ValueError(
            f"reduce_scatter: output holds {output.numel()} elements but input chunk {rank} "
            f"holds {input_list[rank].numel()}"
        )
    flat = torch.cat([t.reshape(-1) for t in input_list])
    dist.all_reduce(flat, op=op, group=group)
    start = sum(t.numel() for t in input_list[:rank])
    output.copy_(flat[start : start + output.numel()].view(output.shape))


# --- Transformer Engine absence -----------------------------------------------------------


def _patch_moe_utils(moe_utils: ModuleType) -> None:
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _disable_jit_fuser(jit: ModuleType) -> None:
    # megatron modules bind ``jit_fuser`` when they import it, right after this runs.
    jit.disable_jit_fuser()

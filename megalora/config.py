"""The one typed config tree. YAML files and `--key value` flags are two spellings of it.

A YAML file may nest keys by section (`lora: {lora_rank: 8}`) or give them flat
(`lora_rank: 8`), as ms-swift's Megatron YAMLs do; flags are always flat. Every field
name is unique across sections, so a flat key names exactly one field. Field docstrings
(the `doc` metadata) are the `--help` text.

Every command reads this tree: `Config`'s sections are the training run, read by `sft` and by
`plan` (which sizes that run); a field's `commands` metadata names the other commands that read
it (`verify` reads `tensor_model_parallel_size`, `export` reads `hub`), and the sections after
`Config` hold the keys of one command alone. `megalora.commands` builds each command's parser
and `--help` from this, so a key has one spelling, default, help text and value parsing.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import yaml

from megalora.errors import UserError
from megalora.swift_keys import ALIASES, REFUSED, REPORTED, SEE_ALSO, coerce_scalar, refusal


class ConfigError(UserError, ValueError):
    """A user mistake in a config key, flag, path or input file; the message names the key or file at fault."""


def _f(default, doc: str, *, choices: tuple | None = None, secret: bool = False, commands: tuple = (),
       aliases: dict | None = None, required: bool = False, positional: bool = False, flags: tuple = ()):
    """A config field. `commands`: commands besides its section's that read it; `aliases`: command ->
    another spelling that command also takes; `required`: the command stops without it; `positional`:
    given without `--key`; `flags`: each choice is also a bare flag (`--merge` for `--mode merge`)."""
    meta = {"doc": doc, "choices": choices, "secret": secret, "commands": commands, "aliases": aliases or {},
            "required": required, "positional": positional, "flags": flags}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    model: str = _f("demo", "HF model folder or hub id (`Qwen/Qwen3-Coder-Next`); `demo` is the embedded tiny Qwen3-Next "
                    "made locally.", commands=("verify",))
    use_hf: bool = _f(False, "Resolve hub ids through the Hugging Face hub instead of ModelScope.",
                      commands=("verify",))
    torch_dtype: str = _f("auto", "Dtype of the frozen base weights (in verify, of both models): auto (bfloat16 on "
                          "GPU, float32 on CPU), float32, bfloat16.",
                          choices=("auto", "float32", "bfloat16", "float16", "float64"), commands=("verify",))
    num_layers: Optional[int] = _f(None, "Build only the first N decoder layers (verification of large models on "
                                   "few GPUs).",
                                    commands=("verify",), aliases={"verify": "layers"})
    moe_grouped_gemm: bool = _f(True, "Routed experts as grouped matrix products over stacked expert weights, base and LoRA "
                                "together (torch._grouped_mm on CUDA bf16 Hopper and on CPU; a padded bmm otherwise). "
                                "false: megatron's loop over experts (SequentialMLP), the slow reference.")


@dataclass
class DataSection:
    dataset: list = _f([], "Training data: JSONL files, folders, globs, `datasets` folders or hub ids; `path_or_id#N` samples N rows.")
    val_dataset: list = _f([], "Held-out evaluation data, same syntax as `dataset`.")
    split_dataset_ratio: float = _f(0.0, "Fraction of `dataset` held out for evaluation when `val_dataset` is empty.")
    max_length: int = _f(2048, "Maximum tokens per sample (and per packed sequence).")
    truncation_strategy: str = _f("delete", "What to do with samples over max_length.", choices=("delete", "left", "right"))
    packing: bool = _f(False, "Pack samples into sequences of max_length; attention never crosses samples.")
    strict: bool = _f(True, "Stop at the first bad data row (true) or skip bad rows and report counts per reason (false).")
    loss_on: str = _f("all_assistant", "Which assistant turns are trained.", choices=("all_assistant", "last_turn"))
    template_mode: str = _f("auto", "How trained turns are masked: auto (one sample per conversation where the chat template renders "
                            "earlier turns as they appear later, else one sample per trained turn: exact for every template), "
                            "per_turn (always one sample per trained turn, with only that turn trained), incremental (one sample "
                            "per conversation; rows the template rewrites are skipped as unmaskable_template).",
                            choices=("auto", "per_turn", "incremental"))
    enable_thinking: Optional[bool] = _f(None, "Chat-template switch of Qwen3 hybrid models (false: empty think block in the "
                                         "generation prompt); unset: the template's default.")
    chat_template_kwargs: dict = _f({}, "Other keyword arguments for the chat template, e.g. '{\"add_vision_id\": true}'.")
    dump_encoded: Optional[str] = _f(None, "Write every encoded training sample to this JSONL file (input_ids, labels "
                                     "aligned with -100 where untrained, source file:line); written by --dry-run and by training.")
    model_name: list = _f([], "Self-cognition placeholder: the model's name (one or two spellings: Chinese, English).")
    model_author: list = _f([], "Self-cognition placeholder: the model's author (one or two spellings).")
    load_from_cache_file: bool = _f(True, "Reuse tokenised data cached from an earlier run with the same inputs.")
    dataset_num_proc: int = _f(1, "Worker processes for tokenisation.")
    num_workers: int = _f(0, "DataLoader worker processes (0: batches are built in the training process).")
    data_seed: int = _f(42, "Seed for dataset sampling and per-epoch shuffling.")
    system: Optional[str] = _f(None, "Default system prompt, put first in every conversation that has no system message.")
    loss_scale: str = _f("default", "Which assistant tokens are trained: default (all of the trained turns), or "
                         "ignore_empty_think (not the empty `<think>\\n\\n</think>\\n\\n` block of Qwen3 hybrid templates).",
                         choices=("default", "ignore_empty_think"))


@dataclass
class LoraSection:
    tuner_type: Optional[str] = _f(None, "Fine-tuning method: lora (also when not given; said at start). Full "
                                   "fine-tuning and other tuners are refused.")
    lora_rank: int = _f(8, "LoRA rank r.")
    lora_alpha: float = _f(32.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    use_rslora: bool = _f(False, "Rank-stabilised scaling alpha/sqrt(r).")
    lora_dtype: str = _f("float32", "Dtype of LoRA weights and their optimizer state (float64 is for exactness checks).", choices=("float32", "bfloat16", "float64"))
    target_modules: list = _f(["all-linear"], "Layers that get LoRA: all-linear, or names such as linear_qkv linear_proj linear_fc1 linear_fc2 in_proj out_proj router shared_expert_gate output_layer.")
    target_regex: Optional[str] = _f(None, "Regex over module names; when set, matching modules get LoRA in addition to target_modules.")
    exclude_modules: list = _f([], "Module names (or substrings) that never get LoRA.")
    lora_per_projection: bool = _f(False, "Inside fused megatron layers (q/k/v, gate/up, GDN qkvz/ba) train one adapter per HF projection (peft's form: stacked A, block-diagonal B) instead of one per fused layer.")
    adapters: Optional[str] = _f(None, "A PEFT adapter folder: training starts from it; verify loads it on both sides.",
                                 commands=("verify",), aliases={"verify": "adapter"})


@dataclass
class ParallelSection:
    tensor_model_parallel_size: int = _f(1, "Tensor-parallel degree (TP).", commands=("verify",))
    sequence_parallel: bool = _f(False, "Shard activations along the sequence across TP ranks (SP); no effect when "
                                 "TP=1.", commands=("verify",))
    expert_model_parallel_size: int = _f(1, "Expert-parallel degree (EP): routed experts are split across EP ranks.",
                                         commands=("verify",))
    expert_tensor_parallel_size: int = _f(1, "Tensor parallelism inside experts. Only 1 is supported.")
    pipeline_model_parallel_size: int = _f(1, "Pipeline-parallel degree. Only 1 is supported.")
    context_parallel_size: int = _f(1, "Context-parallel degree. Only 1 is supported.")
    moe_token_dispatcher_type: str = _f("alltoall", "MoE token dispatcher.", choices=("alltoall", "allgather"))
    distributed_backend: str = _f("auto", "torch.distributed backend. auto: with CUDA the group `cpu:gloo,cuda:nccl` (model tensors "
                                  "over NCCL, the step's CPU bookkeeping over gloo), gloo without; nccl: the same, "
                                  "refused without CUDA; gloo: everything over gloo, so several ranks may share one GPU.",
                                  choices=("auto", "nccl", "gloo"))
    distributed_timeout_minutes: float = _f(30.0, "How long a collective waits for a missing peer before every rank "
                                            "fails: a dead or hung rank stops the job instead of hanging it.")


@dataclass
class TrainSection:
    micro_batch_size: int = _f(1, "Samples (or packed sequences) per micro-batch per DP rank.")
    global_batch_size: int = _f(8, "Samples per optimizer step, over all DP ranks and accumulation steps.")
    train_iters: Optional[int] = _f(None, "Stop after this many optimizer steps (overrides max_epochs when set).")
    max_epochs: int = _f(1, "Epochs over the training data.")
    lr: float = _f(1e-4, "Peak learning rate.")
    min_lr: float = _f(0.0, "Learning rate at the end of decay.")
    lr_warmup_fraction: Optional[float] = _f(None, "Warmup as a fraction of all steps.")
    lr_warmup_iters: int = _f(0, "Warmup steps (used when lr_warmup_fraction is unset).")
    lr_decay_style: str = _f("cosine", "Decay after warmup.", choices=("cosine", "linear", "constant"))
    weight_decay: float = _f(0.1, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.95, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    clip_grad: float = _f(1.0, "Gradient clipping by global norm; 0 disables.")
    seed: int = _f(42, "Random seed: LoRA initialisation and dropout in training, the token batch of verify.",
                   commands=("verify",))
    recompute_granularity: Optional[str] = _f(None, "Activation recomputation.", choices=(None, "full", "selective"))
    recompute_method: Optional[str] = _f(None, "Which layers full recomputation covers.", choices=(None, "uniform", "block"))
    recompute_num_layers: Optional[int] = _f(None, "Layers per recompute chunk (uniform) or recomputed layers (block).")
    moe_aux_loss_coeff: float = _f(0.0, "Coefficient of the MoE load-balancing loss.")
    eval_interval: Optional[int] = _f(None, "Evaluate every N steps (and at the end) when eval data exists.")
    eval_iters: int = _f(10, "Micro-batches per evaluation; -1: the whole eval split (ms-swift's default); 0: no evaluation.")
    log_interval: int = _f(1, "Log every N steps.")


@dataclass
class CheckpointSection:
    save: str = _f("runs/demo", "Run folder: checkpoints, metrics and the resolved config go here.")
    save_interval: Optional[int] = _f(None, "Save a checkpoint every N steps (and always at the end).")
    save_total_limit: Optional[int] = _f(None, "Keep only the last K checkpoints.")
    resume: Optional[str] = _f(None, "Resume from a checkpoint folder, or `latest` in the run folder.")
    no_save_optim: bool = _f(False, "Do not save optimizer and scheduler state.")
    no_save_rng: bool = _f(False, "Do not save RNG state.")
    stop_grace_period: float = _f(600.0, "Seconds `megalora sft` waits, after SIGTERM/SIGINT, for the ranks to finish their step and save before it kills them; size it above one step plus one save.")
    allow_base_model_change: bool = _f(False, "Resume (or export) although the base model's weights differ from the "
                                       "ones the checkpoint was trained on.", commands=("export",))


@dataclass
class LoggingSection:
    report_to: str = _f("none", "Metrics backend besides the local JSONL file.", choices=("none", "wandb"))
    wandb_project: str = _f("megalora", "wandb project.")
    wandb_mode: str = _f("offline", "wandb mode.", choices=("online", "offline", "disabled"))
    wandb_exp_name: Optional[str] = _f(None, "wandb run name (defaults to the run folder's name).")


@dataclass
class ExportSection:
    merge_lora: bool = _f(False, "At the end of training also write the merged HF safetensors export.")
    max_shard_size: str = _f("5GB", "Largest safetensors shard of an export.", commands=("export",))
    push_to_hub: Optional[str] = _f(None, "Hub repository id ('owner/name') to push the export to.", commands=("export",))
    hub: str = _f("modelscope", "Hub to push to.", choices=("modelscope", "huggingface"), commands=("export",))
    hub_token: Optional[str] = _f(None, "Hub token. Prefer the environment variables MODELSCOPE_API_TOKEN / HF_TOKEN (the default): "
                                  "a flag is visible to `ps`. Never written to the run folder, printed or logged.", secret=True,
                                  commands=("export",))
    hub_timeout: float = _f(60.0, "Connect and read timeout (seconds) of each hub request; a hub that stops answering fails the push with one line.", commands=("export",))
    hub_private: bool = _f(True, "Create the hub repository as private.", commands=("export",), aliases={"export": "private"})
    commit_message: str = _f("Upload model trained with megalora", "Commit message of the push.", commands=("export",))


@dataclass
class Config:
    """The training run: read by `sft`, and by `plan`, which sizes it."""
    COMMANDS: ClassVar[tuple] = ("sft", "plan")

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    export: ExportSection = field(default_factory=ExportSection)

    def to_dict(self, *, secrets: bool = False) -> dict:
        """The tree as plain data; secret keys (hub_token) are None unless `secrets` is asked for,
        so what is written, printed or sent to a tracker never holds them."""
        tree = dataclasses.asdict(self)
        if not secrets:
            for key in SECRET_KEYS:
                tree[FIELDS[key][0]][key] = None
        return tree


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


# Keys of one command alone. Each section names the command that reads it.
@dataclass
class VerifySection:
    COMMANDS: ClassVar[tuple] = ("verify",)
    seq_length: int = _f(64, "Tokens per sample of the random token batch both sides run.")
    batch_size: int = _f(2, "Samples in that batch.")
    device: str = _f("auto", "Where megatron runs, and transformers in bfloat16 (auto: cuda when available); the "
                     "float32 reference always runs on the CPU.", choices=("auto", "cpu", "cuda"))
    tolerance: Optional[float] = _f(None, "Largest relative L2 error that passes (unset: 1e-5 in float32, 2e-2 in bfloat16).")


@dataclass
class ExportCommandSection:
    COMMANDS: ClassVar[tuple] = ("export",)
    checkpoint: Optional[str] = _f(None, "A checkpoint-<step>/ folder of a training run.", required=True, positional=True)
    out: Optional[str] = _f(None, "Output folder (created; must be empty if it exists).", required=True)
    mode: str = _f("merge", "merge: LoRA merged into the base weights, written as HF safetensors; adapter: a LoRA "
                   "adapter (layout: adapter_format).", choices=("merge", "adapter"), flags=("merge", "adapter"))
    adapter_format: Optional[str] = _f(None, "With --adapter: vllm (the default; 2D per-expert keys, one rank, loads in "
                                       "vLLM as is), sglang (vllm without the router), peft (transformers 5 + peft's fused "
                                       "expert parameters).", choices=(None, "vllm", "sglang", "peft"))
    verify: bool = _f(True, "Compare the merged model with the unmerged one (holds the model twice in float32).")
    verify_layers: Optional[int] = _f(None, "Verify only the first N decoder layers.")
    hub_endpoint: Optional[str] = _f(None, "Hub address (unset: the hub's own).")


@dataclass
class PlanSection:
    COMMANDS: ClassVar[tuple] = ("plan",)
    num_gpus: Optional[int] = _f(None, "GPUs to plan for (unset: the launch's world size, else 8).")


COMMAND_SECTIONS = {"verify": VerifySection, "export_command": ExportCommandSection, "plan": PlanSection}

# ms-swift / megatron flags that name a fused kernel this build does not have. Accepted, and
# each is reported at start with what runs instead (never silently ignored).
GPU_FUSIONS = {
    "moe_permute_fusion": (False, "megatron's fused permute needs Transformer Engine; its torch permute/unpermute runs"),
    "moe_shared_expert_overlap": (False, "the shared expert runs after the token dispatch, not overlapped with it"),
    "cross_entropy_loss_fusion": (False, "megatron's unfused vocab-parallel cross entropy runs (the same loss)"),
    "attention_backend": ("auto", "attention runs through torch's scaled_dot_product_attention, which picks its own "
                                  "kernel (flash on CUDA where the shapes allow); packed batches through the varlen path"),
    "bias_swiglu_fusion": (False, "Qwen layers have no biases; SwiGLU runs as torch silu(gate) * up"),
    "gradient_accumulation_fusion": (False, "base weights are frozen: there is no weight-gradient accumulation to fuse"),
}


@dataclass
class Extras:
    """Flags accepted for compatibility: reported, never silently ignored."""
    not_applicable: dict = field(default_factory=dict)  # key -> value, for REPORTED keys
    gpu_fusions: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # further lines said at start
    env: dict = field(default_factory=dict)  # a YAML `ENV:` block: variables set before launch


def _field_index(sections: dict[str, type]) -> dict[str, tuple[str, dataclasses.Field]]:
    index = {}
    for name, section in sections.items():
        for f in dataclasses.fields(section):
            assert f.name not in index, f"duplicate config key {f.name}"
            index[f.name] = (name, f)
    return index


_SECTION_TYPES = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
FIELDS = _field_index(_SECTION_TYPES)  # the training tree
ALL_SECTIONS = {**_SECTION_TYPES, **COMMAND_SECTIONS}
ALL_FIELDS = _field_index(ALL_SECTIONS)  # every key of every command
SECRET_KEYS = tuple(key for key, (_, f) in ALL_FIELDS.items() if f.metadata.get("secret"))
_HINTS = {s: typing.get_type_hints(t) for s, t in ALL_SECTIONS.items()}


def section_commands(section: str) -> tuple[str, ...]:
    return COMMAND_SECTIONS[section].COMMANDS if section in COMMAND_SECTIONS else Config.COMMANDS


def command_fields(command: str) -> dict[str, tuple[str, dataclasses.Field]]:
    """The keys `command` reads, in declaration order: key -> (section, field)."""
    return {key: (section, f) for key, (section, f) in ALL_FIELDS.items()
            if command in section_commands(section) or command in f.metadata["commands"]}


def _annotation(key: str):
    section, _ = ALL_FIELDS[key]
    return _HINTS[section][key]


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(key: str, value: Any, where: str) -> Any:
    """Convert a YAML value or a CLI string to the field's type, or raise naming the key."""
    tp, optional = _base_type(_annotation(key))
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and tp is not str):
        if optional:
            return None
        raise ConfigError(f"{where}: `{key}` may not be empty (expected {tp.__name__})")
    if tp is list:
        if isinstance(value, (list, tuple)):
            return [str(v) if not isinstance(v, str) else v for v in value]
        return [str(value)]
    if isinstance(value, list):
        if len(value) == 1:
            value = value[0]
        else:
            raise ConfigError(f"{where}: `{key}` takes one value, got {len(value)}: {value}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: `{key}` expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: `{key}` expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: `{key}` expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: `{key}` expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: `{key}` expects a number, got {value!r}") from None
    if tp is dict:
        try:
            value = yaml.safe_load(value) if isinstance(value, str) else value
        except yaml.YAMLError:
            pass  # reported below as not a mapping
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: `{key}` expects a mapping such as '{{\"name\": value}}', got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: `{key}` expects a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled type {tp} for {key}")


# Keys that change the model's shape: suggested only for a near-exact typo, never for a key
# that means something else (`mtp_num_layers` is not `num_layers`).
_SHAPE_KEYS = {"num_layers"}


def suggestions(key: str, *, n: int = 3, known=None) -> list[str]:
    """Known keys close to `key`, best first, each once: shared words count before spelling. A name
    another trainer uses for one of our keys (`max_steps`) names that key alone. `known`: the names
    one command takes (default: those of `sft`)."""
    if known is None:
        known = [*FIELDS, *ALIASES, *REPORTED, *REFUSED, *GPU_FUSIONS, *SECTIONS]
    if SEE_ALSO.get(key) in known:
        return [SEE_ALSO[key]]
    known = dict.fromkeys(known)
    words = set(key.split("_"))

    def score(cand: str) -> tuple[float, float]:
        shared = len(words & set(cand.split("_"))) / max(len(words | set(cand.split("_"))), 1)
        return (shared + difflib.SequenceMatcher(None, key, cand).ratio(), shared)

    ranked = []
    for cand in known:
        ratio = difflib.SequenceMatcher(None, key, cand).ratio()
        if cand in _SHAPE_KEYS and ratio < 0.9:
            continue
        if ratio >= 0.6 or score(cand)[1] >= 0.5:
            ranked.append(cand)
    return sorted(ranked, key=score, reverse=True)[:n]


def _unknown(key: str, where: str, known=None) -> ConfigError:
    close = suggestions(key, known=known)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"{where}: unknown key `{key}`{hint}")


class ConfigBuilder:
    """Collects the values of one command's keys from YAML and flags, then builds a validated `Config`
    (and, for a command with keys of its own, that command's section: `build_own`).

    A key may be given in any of its spellings (`save` or ms-swift 4's `output_dir`); two
    spellings of one key with different values in one YAML file or one command line are an
    error, while flags override the YAML as usual. The ms-swift tables (aliases, reported,
    refused and fused-kernel keys) belong to the training tree: `sft` and `plan` take them."""

    def __init__(self, command: str = "sft"):
        self.command = command
        self.fields = command_fields(command)
        self.swift = command in Config.COMMANDS
        own = {f.metadata["aliases"][command]: key for key, (_, f) in self.fields.items() if command in f.metadata["aliases"]}
        self.aliases = {**(ALIASES if self.swift else {}), **own}
        # A bare `--merge` is `--mode merge`.
        self.flag_values = {flag: key for key, (_, f) in self.fields.items() for flag in f.metadata["flags"]}
        self.values: dict[str, Any] = {}
        self.extras = Extras()
        self._spelt: dict[tuple[str, str], tuple[str, Any, str]] = {}  # (source, key) -> (spelling, value, where)

    def known(self) -> list[str]:
        """Every name this command takes, for suggestions."""
        names = [*self.fields, *self.aliases, *self.flag_values]
        return names + ([*REPORTED, *REFUSED, *GPU_FUSIONS, *SECTIONS] if self.swift else [])

    def set(self, key: str, value: Any, where: str, *, source: str = "") -> None:
        key = key.replace("-", "_")
        if key in self.aliases:
            self._check_spelling(self.aliases[key], key, value, where, source)
            self.set(self.aliases[key], value, where)
            return
        if self.swift and key in REFUSED:
            reason = refusal(key, value)
            if reason is not None:
                raise ConfigError(f"{where}: `{key}`={coerce_scalar(value)!r} is refused: {reason}")
            self.extras.notes.append(f"--{key} {coerce_scalar(value)}: accepted (megalora's only behaviour)")
            return
        if self.swift and key in REPORTED:
            self.extras.not_applicable[key] = coerce_scalar(value)
            return
        if self.swift and key in GPU_FUSIONS:
            default = GPU_FUSIONS[key][0]
            if isinstance(default, bool):
                value = _coerce_bool(key, value, where)
            self.extras.gpu_fusions[key] = value
            return
        if key not in self.fields:
            raise _unknown(key, where, self.known())
        self._check_spelling(key, key, value, where, source)
        try:
            value = _coerce(key, value, where)
        except ConfigError:
            if key in SECRET_KEYS:
                raise ConfigError(f"{where}: `{key}` expects one string value") from None
            raise
        choices = self.fields[key][1].metadata["choices"]
        if choices is not None and value not in choices:
            allowed = ", ".join(str(c) for c in choices if c is not None)
            raise ConfigError(f"{where}: `{key}` must be one of {allowed}; got {value!r}")
        self.values[key] = value

    def _check_spelling(self, key: str, spelling: str, value: Any, where: str, source: str) -> None:
        if not source:
            return
        earlier = self._spelt.setdefault((source, key), (spelling, value, where))
        if earlier[0] != spelling and _coerce(key, earlier[1], earlier[2]) != _coerce(key, value, where):
            raise ConfigError(f"{where}: `{spelling}`={value!r} conflicts with `{earlier[0]}`={earlier[1]!r} "
                              f"({earlier[2]}): both spell `{key}`; give one")

    def update_yaml(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        source = str(path)
        for key, value in tree.items():
            if key == "ENV":
                self._set_env(value, path)
            elif key in SECTIONS and isinstance(value, dict):
                for sub, sub_value in value.items():
                    if sub in ALL_FIELDS and ALL_FIELDS[sub][0] != key:
                        raise ConfigError(f"{path}: key `{sub}` belongs in section `{ALL_FIELDS[sub][0]}`, not `{key}`")
                    self.set(sub, sub_value, f"{path}: {key}.{sub}", source=source)
            else:
                self.set(key, value, f"{path}: {key}", source=source)

    def _set_env(self, block: Any, path: Path) -> None:
        """ms-swift's `ENV:` block: environment variables for the launch (NPROC_PER_NODE, ...)."""
        if not isinstance(block, dict):
            raise ConfigError(f"{path}: ENV: expected a mapping of environment variables, got {block!r}")
        for name, value in block.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(f"{path}: ENV.{name}: not an environment variable name")
            if isinstance(value, (dict, list)) or value is None:
                raise ConfigError(f"{path}: ENV.{name}: expected a string or number, got {value!r}")
            self.extras.env[name] = str(value).lower() if isinstance(value, bool) else str(value)

    def update_flags(self, argv: list[str]) -> None:
        """Apply `--key value [value ...]` pairs. A bare `--flag` means true."""
        i = 0
        while i < len(argv):
            tok = argv[i]
            if not tok.startswith("--"):
                raise ConfigError(f"unexpected argument {tok!r}: flags are spelt --key value")
            key = tok[2:]
            if "=" in key:
                key, value = key.split("=", 1)
                values = [value]
                i += 1
            else:
                values = []
                i += 1
                while i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2 and not _is_number(argv[i])):
                    values.append(argv[i])
                    i += 1
            norm = key.replace("-", "_")
            if norm in self.flag_values and norm not in self.fields:
                self._set_flag(norm, values)
                continue
            if not values:
                values = ["true"]
            target = self.aliases.get(norm, norm)
            if target in ALL_FIELDS and _base_type(_annotation(target))[0] is list:
                self.set(norm, values, f"--{key}", source="command line")
            else:
                self.set(norm, values if len(values) > 1 else values[0], f"--{key}", source="command line")

    def _set_flag(self, flag: str, values: list[str]) -> None:
        key = self.flag_values[flag]
        if values:
            raise ConfigError(f"--{flag} takes no value (it is `{key}` {flag}); got {' '.join(values)!r}")
        earlier = self._spelt.setdefault(("command line", key), (f"--{flag}", flag, f"--{flag}"))
        if earlier[1] != flag:
            raise ConfigError(f"--{flag} conflicts with {earlier[0]}: both set `{key}`; give one")
        self.set(key, flag, f"--{flag}")

    def set_positionals(self, tokens: list[str]) -> None:
        """Values given without `--key`, in the order the command declares them."""
        keys = [key for key, (_, f) in self.fields.items() if f.metadata["positional"]]
        if len(tokens) > len(keys):
            raise ConfigError(f"unexpected argument {tokens[len(keys)]!r}: flags are spelt --key value")
        for key, token in zip(keys, tokens):
            self.set(key, token, key.upper())

    def build(self) -> Config:
        sections = {name: {} for name in SECTIONS}
        for key, value in self.values.items():
            if ALL_FIELDS[key][0] in sections:
                sections[ALL_FIELDS[key][0]][key] = value
        cfg = Config(**{name: _SECTION_TYPES[name](**kw) for name, kw in sections.items()})
        check_choices(cfg)
        check_static(cfg)
        if cfg.lora.tuner_type is None:
            self.extras.notes.insert(0, "tuner_type not given: LoRA is trained (base weights frozen); ms-swift's "
                                        "Megatron default would be full fine-tuning, which megalora does not offer")
        return cfg

    def build_own(self):
        """The section of keys this command alone reads, or None when it has none."""
        own = [name for name, section in COMMAND_SECTIONS.items() if self.command in section.COMMANDS]
        if not own:
            return None
        (name,) = own
        for key, (section, f) in self.fields.items():
            if section == name and f.metadata["required"] and key not in self.values:
                raise ConfigError(f"{key.upper() if f.metadata['positional'] else '--' + key} is required")
        return COMMAND_SECTIONS[name](**{k: v for k, v in self.values.items() if ALL_FIELDS[k][0] == name})


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def _coerce_bool(key, value, where):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise ConfigError(f"{where}: `{key}` expects true or false, got {value!r}")


def check_choices(cfg: Config) -> None:
    for key, (section, f) in FIELDS.items():
        choices = f.metadata.get("choices")
        value = getattr(getattr(cfg, section), key)
        if choices is not None and value not in choices:
            allowed = ", ".join(str(c) for c in choices if c is not None)
            raise ConfigError(f"`{key}` must be one of {allowed}; got {value!r}")


def check_static(cfg: Config) -> None:
    """Checks that need no world size or model: positive sizes and unsupported modes."""
    p, t, lora, d = cfg.parallel, cfg.train, cfg.lora, cfg.data
    check_parallel_sizes(tp=p.tensor_model_parallel_size, ep=p.expert_model_parallel_size,
                         etp=p.expert_tensor_parallel_size, pp=p.pipeline_model_parallel_size,
                         cp=p.context_parallel_size)
    if lora.tuner_type not in (None, "lora"):
        raise ConfigError(f"`tuner_type`={lora.tuner_type} is refused: megalora trains LoRA only (base weights frozen); "
                          "use --tuner_type lora")
    if p.pipeline_model_parallel_size > 1:
        raise ConfigError(f"`pipeline_model_parallel_size`={p.pipeline_model_parallel_size}: pipeline parallelism is not "
                          "supported yet; use tensor_model_parallel_size / expert_model_parallel_size")
    if p.context_parallel_size > 1:
        raise ConfigError(f"`context_parallel_size`={p.context_parallel_size}: context parallelism is not supported yet")
    if p.expert_tensor_parallel_size != 1:
        raise ConfigError(f"`expert_tensor_parallel_size`={p.expert_tensor_parallel_size}: only 1 is supported "
                          "(experts are split by expert_model_parallel_size)")
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        warnings.warn("`sequence_parallel` has no effect with tensor_model_parallel_size=1; turning it off", stacklevel=2)
        p.sequence_parallel = False
    for key in ("micro_batch_size", "global_batch_size", "lora_rank", "max_length", "log_interval", "dataset_num_proc"):
        section = FIELDS[key][0]
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(f"`{key}` must be >= 1; got {getattr(getattr(cfg, section), key)}")
    if t.eval_iters < -1:
        raise ConfigError(f"`eval_iters` must be -1 (whole eval split), 0 (no evaluation) or more; got {t.eval_iters}")
    if not 0.0 <= lora.lora_dropout < 1.0:
        raise ConfigError(f"`lora_dropout` must be in [0, 1); got {lora.lora_dropout}")
    if t.lr_warmup_fraction is not None and not 0.0 <= t.lr_warmup_fraction < 1.0:
        raise ConfigError(f"`lr_warmup_fraction` must be in [0, 1); got {t.lr_warmup_fraction}")
    if t.min_lr > t.lr:
        raise ConfigError(f"`min_lr`={t.min_lr} is above `lr`={t.lr}")
    if t.recompute_method is not None and t.recompute_granularity != "full":
        raise ConfigError(f"`recompute_method`={t.recompute_method} needs recompute_granularity=full; "
                          f"got recompute_granularity={t.recompute_granularity}")
    if t.recompute_granularity == "full" and t.recompute_method is None:
        t.recompute_method = "uniform"
    if t.recompute_granularity == "full" and t.recompute_num_layers is None:
        t.recompute_num_layers = 1
    if not 0.0 <= d.split_dataset_ratio < 1.0:
        raise ConfigError(f"`split_dataset_ratio` must be in [0, 1); got {d.split_dataset_ratio}")


@dataclass
class ModelShape:
    """What layout validation needs to know of a model (read from its config.json)."""
    num_experts: int = 0
    num_attention_heads: int = 1
    num_query_groups: int = 1
    num_linear_key_heads: int = 0
    num_linear_value_heads: int = 0
    ffn_hidden_size: int = 0
    moe_ffn_hidden_size: int = 0
    shared_expert_ffn_hidden_size: int = 0
    source: str = "model"

    def tp_split(self) -> list[tuple[str, str, int]]:
        """(what, config.json key, count) of every size that tensor parallelism splits."""
        return [("attention heads", "num_attention_heads", self.num_attention_heads),
                ("query groups (key/value heads)", "num_key_value_heads", self.num_query_groups),
                ("linear-attention key heads", "linear_num_key_heads", self.num_linear_key_heads),
                ("linear-attention value heads", "linear_num_value_heads", self.num_linear_value_heads),
                ("MLP rows", "intermediate_size", self.ffn_hidden_size),
                ("expert MLP rows", "moe_intermediate_size", self.moe_ffn_hidden_size),
                ("shared-expert MLP rows", "shared_expert_intermediate_size", self.shared_expert_ffn_hidden_size)]


def check_parallel_sizes(*, tp: int = 1, ep: int = 1, etp: int = 1, pp: int = 1, cp: int = 1,
                         world_size: int | None = None, sequence_parallel: bool = False,
                         model: ModelShape | None = None) -> None:
    """The one check of the parallel sizes: each >= 1, their products dividing `world_size`
    (when known), and the model's heads / experts / MLP rows split evenly (when `model` is
    given). Raises `ConfigError` naming the key at fault."""
    sizes = (("tensor_model_parallel_size", tp), ("expert_model_parallel_size", ep),
             ("expert_tensor_parallel_size", etp), ("pipeline_model_parallel_size", pp),
             ("context_parallel_size", cp))
    for key, size in sizes:
        if size < 1:
            raise ConfigError(f"`{key}` must be >= 1; got {size}")
    if sequence_parallel and tp == 1:
        raise ConfigError("`sequence_parallel`=true needs `tensor_model_parallel_size` > 1")
    if world_size is not None:
        if world_size % (tp * pp * cp):
            raise ConfigError(f"world size {world_size} is not divisible by `tensor_model_parallel_size`={tp}"
                              + (f" x pipeline {pp} x context {cp}" if pp * cp > 1 else ""))
        if world_size % (ep * etp):
            raise ConfigError(f"world size {world_size} is not divisible by `expert_model_parallel_size`={ep}"
                              + (f" x `expert_tensor_parallel_size`={etp}" if etp > 1 else ""))
    if model is None:
        return
    if model.num_experts and model.num_experts % ep:
        raise ConfigError(f"`expert_model_parallel_size`={ep} does not divide the {model.num_experts} experts of "
                          f"{model.source} (num_experts)")
    if not model.num_experts and ep > 1:
        raise ConfigError(f"`expert_model_parallel_size`={ep} but {model.source} has no experts")
    for what, key, count in model.tp_split():
        if count and count % tp:
            raise ConfigError(f"`tensor_model_parallel_size`={tp} does not divide the {count} {what} of "
                              f"{model.source} ({key})")


def check_layout(cfg: Config, *, world_size: int, shape: ModelShape | None = None, how_to_launch=None) -> dict:
    """Validate the parallel layout against the world size and the model. Returns the degrees.

    `how_to_launch(n)`, when given, is the command line that launches n ranks, added to the error
    when the world size does not fit the layout."""
    p, t = cfg.parallel, cfg.train
    tp, ep = p.tensor_model_parallel_size, p.expert_model_parallel_size
    try:
        check_parallel_sizes(tp=tp, ep=ep, world_size=world_size)
    except ConfigError as err:
        if how_to_launch is None:
            raise
        need = math.lcm(tp, ep)
        need *= -(-world_size // need)
        raise ConfigError(f"{err}; launch {need} ranks: {how_to_launch(need)}") from None
    check_parallel_sizes(tp=tp, ep=ep, world_size=world_size, model=shape)
    dp = world_size // tp
    expert_dp = world_size // ep
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(f"`global_batch_size`={t.global_batch_size} is not a multiple of `micro_batch_size`="
                          f"{t.micro_batch_size} x data-parallel size {dp} (world {world_size} / TP {tp})")
    return {"world_size": world_size, "tp": tp, "ep": ep, "dp": dp, "expert_dp": expert_dp,
            "grad_accum": t.global_batch_size // per_step}


def load_config(yaml_path: str | Path | None = None, argv: list[str] | None = None, *,
                command: str = "sft") -> tuple[Config, Extras]:
    """The training tree from a YAML file and `--key value` flags, as `command` (sft or plan) reads them."""
    builder = ConfigBuilder(command)
    if yaml_path is not None:
        builder.update_yaml(yaml_path)
    builder.update_flags(list(argv or []))
    return builder.build(), builder.extras


def split_secret_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """`argv` without the secret flags (`--hub_token T`, `--hub_token=T`), and their values by key:
    a launcher passes those to its children through the environment, never on a command line."""
    kept, secrets, i = [], {}, 0
    while i < len(argv):
        tok = argv[i]
        key, eq, value = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
        if key.replace("-", "_") in SECRET_KEYS:
            if not eq:
                i += 1
                value = argv[i] if i < len(argv) else ""
            secrets[key.replace("-", "_")] = value
        else:
            kept.append(tok)
        i += 1
    return kept, secrets


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(tree: dict) -> Config:
    builder = ConfigBuilder()
    for section, values in tree.items():
        for key, value in values.items():
            builder.set(key, value, f"{section}.{key}")
    return builder.build()

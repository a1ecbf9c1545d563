"""ms-swift's Megatron keys that are not spelt as one of our config fields, and what happens to each.

Our config fields keep ms-swift 3's Megatron names (`max_epochs`, `save`, `save_interval`, ...),
and ms-swift 4's `tuner_type`. Every other ms-swift key we know falls in exactly one table:

- ALIASES: another spelling of one of our fields (ms-swift 4's renames, ms-swift 3's `train_type`, ...).
- REPORTED: accepted and reported by name at start, with why it has no effect here.
- REFUSED: stops with one line saying why (it would change what is trained, or needs a feature
  megalora does not have); a value listed in `allowed` passes as REPORTED instead.
- GPU_FUSIONS (config.py): kernel choices, reported at start with whether they apply.
The README's ms-swift table lists every key of these tables; a test keeps them in step.
"""
from __future__ import annotations

SWIFT4_NAMES = {  # ms-swift 4 (2026-03) renamed these; our fields keep ms-swift 3's names
    "num_train_epochs": "max_epochs",
    "output_dir": "save",
    "save_steps": "save_interval",
    "eval_steps": "eval_interval",
    "logging_steps": "log_interval",
    "dataloader_num_workers": "num_workers",
}
SWIFT3_NAMES = {"train_type": "tuner_type",  # our field has ms-swift 4's name
                "no_save_rng_state": "no_save_rng"}
ALIASES = {**SWIFT4_NAMES, **SWIFT3_NAMES}

# Names from other trainers (transformers' Trainer, ms-swift's non-Megatron `swift sft`) that mean
# one of our keys but not exactly: not accepted (the meaning differs), but the hint names the key.
SEE_ALSO = {
    "max_steps": "train_iters",
    "learning_rate": "lr",
    "warmup_ratio": "lr_warmup_fraction",
    "warmup_steps": "lr_warmup_iters",
    "lr_scheduler_type": "lr_decay_style",
    "max_grad_norm": "clip_grad",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "global_batch_size",
    "gradient_checkpointing": "recompute_granularity",
    "lora_r": "lora_rank",
    "resume_from_checkpoint": "resume",
}

_HF = "weights are always read straight from the HF safetensors folder given by --model"
REPORTED = {
    "load_safetensors": _HF,
    "save_safetensors": "checkpoints are LoRA adapters in safetensors and exports are HF safetensors, whatever the value",
    "use_mcore_models": "megatron-core models are always used",
    "finetune": "a run always starts from the HF weights at step 0; continue a megalora run with --resume",
    "model_type": "the architecture is read from the model's config.json",
    "template": "the tokenizer's own chat template is used; its options go in enable_thinking / chat_template_kwargs",
    "template_backend": "the model's own jinja chat template is always rendered",
    "masked_softmax_fusion": "a kernel choice inside attention; megalora's attention masks per sample either way",
    "no_masked_softmax_fusion": "a kernel choice inside attention; megalora's attention masks per sample either way",
    "padding_free": "padding is chosen by --packing; the loss never counts padding either way",
    "add_version": "the run folder is --save itself; an earlier run there is moved aside",
    "no_initialization": "base weights are always loaded, never initialised",
    "mtp_num_layers": "multi-token-prediction layers are neither built nor trained; the main model's LoRA is unaffected "
                      "and the base MTP weights stay as they are",
    "use_distributed_optimizer": "only LoRA weights have optimizer state; it is not sharded",
    "overlap_grad_reduce": "LoRA gradients are reduced after backward",
    "overlap_param_gather": "LoRA weights are not sharded, so nothing is gathered",
    "optimizer_cpu_offload": "only LoRA weights have optimizer state; it stays on the GPU",
    "use_precision_aware_optimizer": "LoRA optimizer state is kept in lora_dtype",
    "fp8_format": "training computes in torch_dtype; FP8 compute needs Transformer Engine, which is not used",
    "fp8_recipe": "training computes in torch_dtype; FP8 compute needs Transformer Engine, which is not used",
    "fp8_param_gather": "training computes in torch_dtype; FP8 compute needs Transformer Engine, which is not used",
    "moe_router_dtype": "the router always computes in float32",
    "freeze_llm": "for multimodal models only; megalora trains text models",
    "freeze_vit": "for multimodal models only; megalora trains text models",
    "freeze_aligner": "for multimodal models only; megalora trains text models",
    "vit_gradient_checkpointing": "for multimodal models only; megalora trains text models",
    "lazy_tokenize": "data is always tokenised (and cached) before step 1, so bad rows show at once",
    "ckpt_format": "checkpoints are LoRA adapters in safetensors",
    "tensorboard_dir": "metrics go to <save>/metrics.jsonl (and wandb with --report_to wandb)",
    "seq_length": "sequence length is --max_length",
    "dataloader_type": "the sampler is megalora's own (seeded, resumable)",
    "ddp_timeout": "torch.distributed's default timeout is used",
    "manual_gc": "Python's garbage collector runs as usual",
    "manual_gc_interval": "Python's garbage collector runs as usual",
    "log_throughput": "tokens/s are always logged",
    "bf16": "the dtype is --torch_dtype",
    "fp16": "the dtype is --torch_dtype",
    "attention_softmax_in_fp32": "megatron-core's default (true) is kept",
}

# key -> (values that pass as reported, reason for refusing any other); `()`: every value is refused.
REFUSED = {
    "decoder_first_pipeline_num_layers": ((), "pipeline parallelism is not supported"),
    "decoder_last_pipeline_num_layers": ((), "pipeline parallelism is not supported"),
    "load": ((), "megatron (mcore) checkpoints are not read: give the HF folder with --model, a megalora checkpoint "
                 "with --resume, or a PEFT adapter with --adapters"),
    "mcore_model": ((), "megatron (mcore) checkpoints are not read: give the HF folder with --model"),
    "adapter_load": ((), "mcore adapters are not read: continue a megalora run with --resume, or start from a PEFT "
                         "adapter with --adapters"),
    "mcore_adapter": ((), "mcore adapters are not read: start from a PEFT adapter with --adapters"),
    "streaming": ((False,), "streaming datasets are not supported: data is tokenised before step 1"),
    "task_type": (("causal_lm",), "only causal language modelling (causal_lm) is trained"),
    "calculate_per_token_loss": ((True,), "the loss is always the mean over the trained tokens of the global batch"),
    "lora_bias": (("none",), "LoRA has no bias here"),
    "modules_to_save": (([],), "only LoRA weights are trained"),
    "rlhf_type": ((), "only supervised fine-tuning (sft) is offered"),
}


def coerce_scalar(value):
    """A CLI string as YAML would read it (true -> True, 1 -> 1); YAML values stay as they are."""
    import yaml

    if isinstance(value, str):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


def refusal(key: str, value) -> str | None:
    """Why `key`=`value` is refused, or None when the value is one that may pass."""
    allowed, reason = REFUSED[key]
    value = coerce_scalar(value)
    if isinstance(value, list) and not (value == [] and [] in allowed):
        value = value[0] if len(value) == 1 else value
    if value in allowed or (isinstance(value, str) and value.lower() in [str(a).lower() for a in allowed]):
        return None
    return reason

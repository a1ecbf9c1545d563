"""LoRA for megatron-core models: dense wrappers, routed-expert adapters, target selection."""

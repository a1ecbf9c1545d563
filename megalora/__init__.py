"""megalora: LoRA fine-tuning of Mixture-of-Experts LLMs on megatron-core."""
__version__ = "0.1.0"

"""Hugging Face interop: import and export HF model directories (config.json +
safetensors) for the LLaMA family (Llama 2/3/3.1, Mistral, Qwen2, Qwen3, and the mixtures of
experts Mixtral and Qwen3-MoE), GPT-2, BERT, RoBERTa and T5 (v1.1, FLAN-T5)."""

from jaxtrain.models.hf.config import ARCHITECTURES, config_from_hf, config_to_hf, read_config
from jaxtrain.models.hf.convert import (
    MAX_SHARD_BYTES,
    check_architecture,
    from_pretrained,
    load_params,
    save_pretrained,
)

__all__ = [
    "ARCHITECTURES",
    "MAX_SHARD_BYTES",
    "check_architecture",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "load_params",
    "read_config",
    "save_pretrained",
]

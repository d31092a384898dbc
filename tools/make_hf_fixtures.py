"""Make the tiny Hugging Face checkpoints that the parity tests import.

For each covered architecture this builds a randomly initialised model with
``transformers`` on CPU ``torch`` (float32, eager attention), saves it with
``save_pretrained`` (safetensors) and saves its logits on fixed inputs as ``.npy``:

    tests/fixtures/hf/<name>/config.json, model.safetensors (or shards + index),
                             input_ids.npy [2, 24] int32, logits.npy [2, 24, V] float32

Weights are drawn wider than transformers' default init (and norm scales and biases away
from 1 and 0), so that logits spread out and a wrong layout cannot pass by accident.
The tests also import :func:`build` to make fresh models for the live round trip.

Usage: ``python tools/make_hf_fixtures.py [OUT_DIR]`` (needs ``pip install -e .[hf]``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf"
BATCH, LENGTH, VOCAB = 2, 24, 96

_SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
}

# name -> (transformers config class, its arguments)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", _SMALL),
    # Llama 3.1: scaled RoPE (with head_dim 16 and theta 5e5 the frequencies fall in all
    # three bands: kept, blended, divided by factor), one kv head, tied embeddings.
    "llama3": (
        "LlamaConfig",
        _SMALL
        | {
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "tie_word_embeddings": True,
            "max_position_embeddings": 256,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2": ("Qwen2Config", _SMALL | {"tie_word_embeddings": True}),
    # head_dim 16 != hidden_size / heads = 8, as in Qwen3-4B.
    "qwen3": ("Qwen3Config", _SMALL | {"head_dim": 16}),
    # A window of 5 tokens, much shorter than the 24-token inputs.
    "mistral": ("MistralConfig", _SMALL | {"sliding_window": 5}),
    "gpt2": (
        "GPT2Config",
        {
            "vocab_size": VOCAB,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 32,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    ),
}


def build(name: str, seed: int = 0) -> Any:
    """A float32 ``*ForCausalLM`` of variant ``name`` with seeded random weights."""
    import torch
    import transformers

    cls_name, kwargs = VARIANTS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(0.15 * noise)
            elif pname.endswith("bias"):
                p.copy_(0.1 * noise)
            else:  # a norm scale
                p.copy_(1.0 + 0.1 * noise)
    return model.eval()


def inputs(seed: int = 0) -> np.ndarray:
    """Fixed token ids [BATCH, LENGTH] int32."""
    return np.random.default_rng(seed).integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)


def logits(model: Any, ids: np.ndarray) -> np.ndarray:
    """The model's float32 logits [B, L, V] for ``ids``."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def _tokenizer(directory: Path) -> None:
    """A word-level tokenizer.json over a few words, with GPT-2's end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["the", "a", "model", "trains", "on", "text", "and", "then", "it", "writes", "more"]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


def main(out: Path = OUT) -> None:
    for name in VARIANTS:
        directory = out / name
        shutil.rmtree(directory, ignore_errors=True)
        model = build(name)
        # One sharded checkpoint (files of at most 40 KB, with an index) to cover that path.
        model.save_pretrained(directory, max_shard_size="40KB" if name == "llama" else "50GB")
        (directory / "generation_config.json").unlink(missing_ok=True)
        ids = inputs()
        np.save(directory / "input_ids.npy", ids)
        np.save(directory / "logits.npy", logits(model, ids))
        if name == "gpt2":
            _tokenizer(directory)
        size = sum(f.stat().st_size for f in directory.iterdir())
        print(f"{directory}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)

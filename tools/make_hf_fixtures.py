"""Make the tiny Hugging Face checkpoints that the parity tests import.

For each covered architecture this builds a randomly initialised model with
``transformers`` on CPU ``torch`` (float32, eager attention), saves it with
``save_pretrained`` (safetensors) and saves its logits on fixed inputs as ``.npy``:

    tests/fixtures/hf/<name>/config.json, model.safetensors (or shards + index),
                             input_ids.npy [2, 24] int32, logits.npy [2, 24, V] float32

BERT also gets ``token_type_ids.npy`` [2, 24] (both token types), T5
``decoder_input_ids.npy`` [2, 16] (its logits are then [2, 16, V]); RoBERTa's inputs hold
padding tokens, which move its positions.

Weights are drawn wider than transformers' default init (and norm scales and biases away
from 1 and 0), so that logits spread out and a wrong layout cannot pass by accident.
The tests also import :func:`build` to make fresh models for the live round trip.

Usage: ``python tools/make_hf_fixtures.py [OUT_DIR [NAME ...]]`` (needs
``pip install -e .[hf]``).
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

_ENCODER = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 32,
}
# T5 v1.1: gated GELU, head_dim 4 != d_model / heads = 8, and 8 buckets up to distance
# 20, so 24-token inputs reach the logarithmic buckets and the shared last one.
_T5 = {
    "vocab_size": VOCAB,
    "d_model": 32,
    "d_kv": 4,
    "d_ff": 40,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 20,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
    "decoder_start_token_id": 0,
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
    # Mixtures of experts, 2 of 4 per token: Mixtral renormalises the two weights (its
    # intermediate_size is each expert's width); Qwen3-MoE here does not
    # (norm_topk_prob false, transformers' default), with experts narrower than its
    # dense intermediate_size and Qwen3's head_dim 16.
    "mixtral": (
        "MixtralConfig",
        _SMALL | {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        _SMALL
        | {
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 24,
            "norm_topk_prob": False,
        },
    ),
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
    "bert": ("BertConfig", _ENCODER),
    # RoBERTa: positions count from pad_token_id + 1, so 34 rows for 32 tokens.
    "roberta": (
        "RobertaConfig",
        _ENCODER | {"max_position_embeddings": 34, "type_vocab_size": 1, "layer_norm_eps": 1e-5},
    ),
    "t5": ("T5Config", _T5),
}
# Live round trip only (tests/test_hf_live.py): the original T5's tied head with its
# output scaled by d_model^-0.5, and the head transformers 5 builds for v1.1 configs
# (tied to ``shared`` without the scaling; the checkpoint then has no lm_head.weight);
# Mixtral with a window, and Qwen3-MoE renormalising its top-k (as Qwen3-30B-A3B does).
LIVE_VARIANTS = VARIANTS | {
    "t5_tied": ("T5Config", _T5 | {"tie_word_embeddings": True}),
    "t5_shared_head": ("T5Config", _T5),
    "mixtral_window": ("MixtralConfig", VARIANTS["mixtral"][1] | {"sliding_window": 5}),
    "qwen3_moe_norm": ("Qwen3MoeConfig", VARIANTS["qwen3_moe"][1] | {"norm_topk_prob": True}),
}
# v1.1 / FLAN-T5 heads are their own tensor (transformers 5 would tie them, see above).
UNTIED_HEAD = {"t5"}
AUTO_CLASS = {
    "bert": "AutoModelForMaskedLM",
    "roberta": "AutoModelForMaskedLM",
    "t5": "AutoModelForSeq2SeqLM",
    "t5_tied": "AutoModelForSeq2SeqLM",
    "t5_shared_head": "AutoModelForSeq2SeqLM",
}
DECODER_LENGTH = 16


def auto_class(name: str) -> Any:
    """The transformers auto class of variant ``name`` (``AutoModelForCausalLM``, ...)."""
    import transformers

    return getattr(transformers, AUTO_CLASS.get(name, "AutoModelForCausalLM"))


def build(name: str, seed: int = 0) -> Any:
    """A float32 model of variant ``name`` (``*ForCausalLM``, ``*ForMaskedLM`` or
    ``T5ForConditionalGeneration``) with seeded random weights."""
    import torch
    import transformers

    cls_name, kwargs = LIVE_VARIANTS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = auto_class(name).from_config(config, attn_implementation="eager", dtype=torch.float32)
    if name in UNTIED_HEAD:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
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


def inputs(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed int32 model inputs by transformers' argument name: ``input_ids`` [BATCH,
    LENGTH], and BERT's ``token_type_ids`` or T5's ``decoder_input_ids``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    out = {"input_ids": ids}
    if name == "bert":
        out["token_type_ids"] = (np.arange(LENGTH) >= LENGTH // 2).astype(np.int32)[None]
        out["token_type_ids"] = np.repeat(out["token_type_ids"], BATCH, axis=0)
    if name == "roberta":
        ids[0, 20:] = 1  # trailing padding (pad_token_id 1) ...
        ids[1, 7] = 1  # ... and a padding token mid-row, which shifts the later positions
    if name.startswith("t5"):
        dec = rng.integers(0, VOCAB, (BATCH, DECODER_LENGTH)).astype(np.int32)
        dec[:, 0] = 0  # decoder_start_token_id
        out["decoder_input_ids"] = dec
    return out


def logits(model: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The model's float32 logits [B, L, V] (T5: [B, M, V]) for inputs ``feed``."""
    import torch

    args = {k: torch.from_numpy(v.astype(np.int64)) for k, v in feed.items()}
    with torch.no_grad():
        return model(**args).logits.float().numpy()


def _tokenizer(directory: Path) -> None:
    """A word-level tokenizer.json over a few words, with GPT-2's end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["the", "a", "model", "trains", "on", "text", "and", "then", "it", "writes", "more"]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


def main(out: Path = OUT, names: list[str] | None = None) -> None:
    for name in names or VARIANTS:
        directory = out / name
        shutil.rmtree(directory, ignore_errors=True)
        model = build(name)
        # One sharded checkpoint (files of at most 40 KB, with an index) to cover that path.
        model.save_pretrained(directory, max_shard_size="40KB" if name == "llama" else "50GB")
        (directory / "generation_config.json").unlink(missing_ok=True)
        feed = inputs(name)
        for key, value in feed.items():
            np.save(directory / f"{key}.npy", value)
        np.save(directory / "logits.npy", logits(model, feed))
        if name == "gpt2":
            _tokenizer(directory)
        size = sum(f.stat().st_size for f in directory.iterdir())
        print(f"{directory}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT, sys.argv[2:])

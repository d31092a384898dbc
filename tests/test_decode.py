"""Incremental decoding over a KV cache equals a full forward over the growing sequence:
left-padded prompts of different lengths, grouped-query heads, Qwen's biases and norms,
GPT-2's learned positions, and Mistral's sliding window past its length, in a full cache
and in a rolling buffer of ``window`` entries (the prompt longer than the window)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import TINY

from jaxtrain import config, models
from jaxtrain.models.kv_cache import cache_slots, empty_cache

VARIANTS = {
    "llama": (),
    "qwen": ("model.qkv_bias=true", "model.qk_norm=true", "model.head_dim=32"),
    "mistral": ("model.sliding_window=3",),
    "mistral-rolling": ("model.sliding_window=4",),  # 6 prompt slots: the buffer wraps
    "gpt2": ("model.family=gpt2",),
}
PROMPT, NEW = 6, 5  # padded prompt length, tokens fed one at a time after it
PADS = np.array([0, 2, 5])  # left padding of each row's prompt


@functools.cache
def model(variant):
    cfg = config.load(None, [*TINY, *VARIANTS[variant]]).model
    return cfg, models.build(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decode_equals_full_forward(variant):
    cfg, net = model(variant)
    graphdef, state = nnx.split(net)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(len(PADS), PROMPT + NEW), dtype=np.int32)

    @jax.jit
    def decode(state, tokens, cache, slot, pad):
        return nnx.merge(graphdef, state).decode(tokens, cache, slot, pad)

    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    slots = PROMPT + NEW
    if variant.endswith("rolling"):
        slots = cache_slots(slots, cfg.sliding_window)
        assert slots == cfg.sliding_window < PROMPT
    cache = empty_cache(cfg.n_layers, len(PADS), slots, cfg.n_kv_heads, cfg.head_dim, jnp.float32)
    pad = jnp.asarray(PADS)
    prefill, cache = decode(state, jnp.asarray(tokens[:, :PROMPT]), cache, 0, pad)
    steps = [np.asarray(prefill[:, -1])]
    for slot in range(PROMPT, PROMPT + NEW):
        logits, cache = decode(state, jnp.asarray(tokens[:, slot : slot + 1]), cache, slot, pad)
        steps.append(np.asarray(logits[:, 0]))
    for row, p in enumerate(PADS):
        whole = np.asarray(forward(state, jnp.asarray(tokens[row : row + 1, p:])))[0]
        # prompt positions, then one per decode step
        want = whole[PROMPT - p - 1 :]
        got = np.stack([s[row] for s in steps])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(prefill[row, p:]), whole[: PROMPT - p], rtol=1e-5, atol=1e-5
        )

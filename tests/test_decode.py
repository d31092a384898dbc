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


def test_t5_cached_decode_equals_full_forward():
    """The encoder reads the left-padded prompts once; each decoder step over the cached
    self- and cross-attention keys equals the full decoder over the growing sequence."""
    t5 = ("model.family=t5", "model.n_kv_heads=4", "train.objective=span_corruption")
    cfg = config.load(None, [*TINY, *t5]).model
    graphdef, state = nnx.split(models.build(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    prompts = rng.integers(2, cfg.vocab_size, size=(len(PADS), PROMPT), dtype=np.int32)
    targets = rng.integers(2, cfg.vocab_size, size=(len(PADS), NEW), dtype=np.int32)
    start = np.full((len(PADS), 1), cfg.decoder_start_id, np.int32)
    decoder_inputs = np.concatenate([start, targets[:, :-1]], axis=1)  # [B, NEW]

    @jax.jit
    def cached(state, prompts, pad, targets):
        model = nnx.merge(graphdef, state)
        logits, decoding = model.prefill(prompts, pad, NEW)
        steps = [logits]
        for i in range(NEW - 1):
            logits, decoding = model.step(targets[:, i], decoding, i)
            steps.append(logits)
        return jnp.stack(steps, axis=1)  # [B, NEW, V]

    forward = jax.jit(lambda state, x, y: nnx.merge(graphdef, state)(x, y))
    got = np.asarray(cached(state, prompts, jnp.asarray(PADS), targets))
    for row, p in enumerate(PADS):
        want = np.asarray(forward(state, prompts[row : row + 1, p:], decoder_inputs[row : row + 1]))
        np.testing.assert_allclose(got[row], want[0], rtol=1e-5, atol=1e-5)

"""Next-token sampling: one decode step's logits to tokens, exactly as transformers would.

Pure functions of ``[B, V]`` logits (B batch, V vocab), applied in transformers' order:
the repetition penalty (CTRL, Keskar et al., 2019, https://arxiv.org/abs/1909.05858),
then temperature, top-k (Fan et al., 2018) and top-p, the nucleus (Holtzman et al., 2019,
https://arxiv.org/abs/1904.09751); then the argmax (greedy) or a categorical draw. Each
step reproduces transformers' ``RepetitionPenaltyLogitsProcessor``,
``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper`` (filtered
tokens become ``-inf``), and a step that is off is skipped, as ``generate`` skips it.
The draw itself uses JAX's generator, so sampled tokens match transformers in
distribution, not token for token.

The repetition penalty needs the tokens each row has seen. The decode loop carries them as
a ``[B, V]`` bool mask, built once from the prompt (``seen_mask``) and updated with each
step's tokens (``mark_seen``), so no step gathers over the sequence. ``sample`` has no
Python branch on traced values: jit it with the config static and it can run inside a
``lax.while_loop`` body.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxtrain.errors import UserError

# transformers' filter_value: a filtered token gets probability exactly 0. At least one
# token of each row always survives, so softmax and the draw never see a row of -inf.
FILTERED = -jnp.inf


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"{key}: {message}")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How ``sample`` picks the next token; hashable, so it can be a static jit argument.

    ``greedy`` is transformers' ``do_sample=False``: the argmax after the repetition
    penalty, with temperature, top-k and top-p unused (as in transformers, where they
    apply only when sampling). Temperature must be positive; for the argmax set
    ``greedy``. transformers' ``generate`` defaults ``top_k`` to 50 when neither the model
    nor the user sets it; here 0 means off, so set 50 to reproduce that default.
    """

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; > 1 discourages seen tokens
    greedy: bool = False

    def __post_init__(self):
        _check(
            isinstance(self.temperature, int | float)
            and math.isfinite(self.temperature)
            and self.temperature > 0,
            "generate.temperature",
            "must be positive and finite (greedy: true for the argmax)",
        )
        _check(
            isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
            "generate.top_k",
            "must be an integer >= 0 (0: off)",
        )
        _check(
            isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0,
            "generate.top_p",
            "must be in (0, 1] (1: off)",
        )
        _check(
            isinstance(self.repetition_penalty, int | float)
            and math.isfinite(self.repetition_penalty)
            and self.repetition_penalty > 0,
            "generate.repetition_penalty",
            "must be positive and finite (1: off)",
        )
        _check(isinstance(self.greedy, bool), "generate.greedy", "must be true or false")

    @classmethod
    def at_temperature(cls, temperature: float, **options) -> SamplingConfig:
        """The command line's convention: temperature 0 is greedy (the argmax), any other
        samples at that temperature, with ``options`` (top_k, top_p, ...)."""
        greedy = temperature == 0
        return cls(temperature=1.0 if greedy else temperature, greedy=greedy, **options)


def seen_mask(tokens: jax.Array, vocab_size: int, valid: jax.Array | None = None) -> jax.Array:
    """The ``[B, V]`` mask of the tokens that occur in each row of ``tokens``.

    Args:
        tokens: ``[B, T]`` int token ids, usually the prompt.
        vocab_size: V.
        valid: optional ``[B, T]`` bool; False positions (padding) are not counted.
            transformers ignores a prompt's left padding (it passes the attention mask's
            leading zeros as ``prompt_ignore_length``), so pass the attention mask.

    Returns:
        ``[B, V]`` bool, True where the token occurs.
    """
    if valid is not None:  # V is out of range: the scatter drops it
        tokens = jnp.where(valid, tokens, vocab_size)
    rows = jnp.arange(tokens.shape[0])[:, None]
    empty = jnp.zeros((tokens.shape[0], vocab_size), dtype=jnp.bool_)
    return empty.at[rows, tokens].set(True, mode="drop")


def mark_seen(seen: jax.Array, tokens: jax.Array) -> jax.Array:
    """``seen`` ``[B, V]`` with each row's new token, ``tokens`` ``[B]``, marked."""
    return seen.at[jnp.arange(tokens.shape[0]), tokens].set(True, mode="drop")


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """Penalise seen tokens once each: a negative logit is multiplied by ``penalty``, any
    other divided by it (transformers' ``RepetitionPenaltyLogitsProcessor``).

    Args:
        logits: ``[B, V]`` float32.
        seen: ``[B, V]`` bool, the tokens in each row's prompt and output so far.
        penalty: > 1 discourages repeats, < 1 encourages them.

    Returns:
        ``[B, V]`` float32 logits.
    """
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def scale_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    """``logits / temperature`` (transformers' ``TemperatureLogitsWarper``). A division, not
    a multiplication by the inverse, so the rounding is the same as transformers'."""
    return logits / temperature


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep each row's tokens whose logit is at least its k-th largest, ties at that value
    included; the rest become ``-inf`` (transformers' ``TopKLogitsWarper``).

    Args:
        logits: ``[B, V]`` float32.
        k: tokens to keep; 0 keeps all, and k is clipped to V.

    Returns:
        ``[B, V]`` float32 logits.
    """
    k = min(k, logits.shape[-1])
    if k <= 0:
        return logits
    kth = jax.lax.top_k(logits, k)[0][:, -1:]  # [B, 1]
    return jnp.where(logits < kth, FILTERED, logits)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filtering as transformers' ``TopPLogitsWarper`` does it: sort ascending,
    take the cumulative softmax, remove the tokens whose cumulative probability is
    <= 1 - top_p, but never the most probable one; removed tokens become ``-inf``.

    Ties are ordered by token id (a stable sort: among equal logits the lower id is
    removed first). transformers' sort is not stable, so its choice between tied tokens
    that straddle the cut is unspecified.

    Args:
        logits: ``[B, V]`` float32.
        top_p: in (0, 1]; 1 keeps all, as ``generate`` skips the warper at 1. Or a
            ``[B, 1]`` array: each row's own (serving a batch of requests).

    Returns:
        ``[B, V]`` float32 logits.
    """
    if isinstance(top_p, float | int) and top_p >= 1.0:
        return logits
    order = jnp.argsort(logits, axis=-1, stable=True)  # [B, V] ascending
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    # 1 - top_p in double precision, then rounded to float32, like torch's comparison
    # of a float32 tensor with a Python float.
    remove_sorted = (cumulative <= 1.0 - top_p).at[:, -1].set(False)
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, FILTERED, logits)


def process_logits(logits: jax.Array, seen: jax.Array | None, config: SamplingConfig) -> jax.Array:
    """The logits ``sample`` draws from: float32, then each step that is on, in
    transformers' order (repetition penalty; then, unless greedy, temperature, top-k,
    top-p).

    Args:
        logits: ``[B, V]``, any float dtype; cast to float32 as transformers does.
        seen: ``[B, V]`` bool (see ``seen_mask``); may be None when the penalty is off.
        config: the sampling settings.

    Returns:
        ``[B, V]`` float32 logits, filtered tokens ``-inf``.
    """
    logits = logits.astype(jnp.float32)
    if config.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("repetition_penalty needs the seen-token mask")
        logits = repetition_penalty(logits, seen, config.repetition_penalty)
    if config.greedy:
        return logits
    if config.temperature != 1.0:
        logits = scale_temperature(logits, config.temperature)
    logits = top_k_filter(logits, config.top_k)
    return top_p_filter(logits, config.top_p)


def sample(
    logits: jax.Array, key: jax.Array, seen: jax.Array | None, config: SamplingConfig
) -> jax.Array:
    """The next token of each row.

    Args:
        logits: ``[B, V]`` the last position's logits.
        key: a PRNG key; unused when greedy.
        seen: ``[B, V]`` bool (see ``seen_mask``); may be None when the penalty is off.
        config: the sampling settings; static under jit.

    Returns:
        ``[B]`` int32 token ids.
    """
    logits = process_logits(logits, seen, config)
    if config.greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        tokens = jax.random.categorical(key, logits, axis=-1)
    return tokens.astype(jnp.int32)

"""Prefill and decode on the device: prompts in, new tokens out, one compile per shape.

``generate_tokens`` takes left-padded prompts ``[B, T]`` (row b's first ``pad[b]``
tokens are padding) and returns ``[B, max_new]`` new tokens. Two jitted functions do
the work: ``prefill_tokens`` runs the prompt through the model once, filling a
preallocated KV cache, and picks the first token; ``decode_tokens`` then feeds one token
per row per step in a ``lax.while_loop`` until every row has produced its EOS or
``max_new`` tokens. ``generate_tokens`` compiles the two as one XLA program, once per
(batch, prompt length, max_new, sampling) and never per token; a server can call them
apart. Rows that are done emit ``pad_id``. With ``stream``, each
step's tokens also reach the host as they are made (``streaming``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxtrain.generate.sampling import SamplingConfig, mark_seen, sample, seen_mask
from jaxtrain.models.decoding import DecodeState

# Where streamed tokens go: the innermost sink set by ``streaming`` (the compiled loop
# calls one fixed function, so a new sink does not recompile it). Host callbacks are not
# ordered on several devices, so each carries its step and the sink is fed in order.
_SINKS: list[_InOrder] = []


class _InOrder:
    """Hands a sink each step's tokens in step order, whatever order they arrive in."""

    def __init__(self, sink: Callable[[np.ndarray], None]):
        self.sink, self.next, self.pending = sink, 0, {}

    def __call__(self, step: int, tokens: np.ndarray) -> None:
        self.pending[step] = tokens
        while self.next in self.pending:
            self.sink(self.pending.pop(self.next))
            self.next += 1


def _emit(step: Any, tokens: Any) -> None:
    if _SINKS:
        _SINKS[-1](int(step), np.asarray(tokens))


@contextlib.contextmanager
def streaming(sink: Callable[[np.ndarray], None]) -> Iterator[None]:
    """Within this block, ``generate_tokens(..., stream=True)`` hands ``sink`` each
    step's [B] tokens as the device produces them, in order (rows that are done give
    ``pad_id``)."""
    _SINKS.append(_InOrder(sink))
    try:
        yield
    finally:
        _SINKS.pop()


@struct.dataclass
class Prefilled:
    """What prefill hands the decode loop: each row's first new token, the model's
    :class:`~jaxtrain.models.decoding.DecodeState`, the [B, V] tokens seen (for the
    repetition penalty) and the PRNG key of the next draw."""

    token: jax.Array
    decoding: DecodeState
    seen: jax.Array
    key: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "sampling"))
def prefill_tokens(
    graphdef: Any,
    state: Any,
    prompts: jax.Array,
    pad: jax.Array,
    key: jax.Array,
    *,
    max_new: int,
    sampling: SamplingConfig,
) -> Prefilled:
    """Read the left-padded ``prompts`` [B, T] (row b padded by ``pad[b]``) into a cache
    with room for ``max_new`` new tokens and pick each row's first one."""
    model = nnx.merge(graphdef, state)
    logits, decoding = model.prefill(prompts, pad, max_new)
    seen_tokens, valid = model.penalized(prompts, pad)
    seen = seen_mask(seen_tokens, model.cfg.vocab_size, valid)
    key, first = jax.random.split(key)
    return Prefilled(sample(logits, first, seen, sampling), decoding, seen, key)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new", "sampling", "eos_id", "pad_id", "stream"),
)
def decode_tokens(
    graphdef: Any,
    state: Any,
    prefilled: Prefilled,
    *,
    max_new: int,
    sampling: SamplingConfig,
    eos_id: int | None = None,
    pad_id: int = 0,
    stream: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The decode loop after :func:`prefill_tokens`: up to
    ``max_new`` tokens per row in one ``lax.while_loop``; returns as
    :func:`generate_tokens`."""
    model = nnx.merge(graphdef, state)
    batch = prefilled.token.shape[0]
    out = jnp.full((batch, max_new), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)
    count = jnp.zeros((batch,), jnp.int32)

    def running(carry):
        step, *_, done, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def step_fn(carry):
        step, token, decoding, seen, out, count, done, key = carry
        emitted = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(emitted)
        if stream:
            jax.debug.callback(_emit, step, emitted)
        count = count + (~done).astype(jnp.int32)
        if eos_id is not None:
            done = done | (token == eos_id)
        seen = mark_seen(seen, token)
        logits, decoding = model.step(token, decoding, step)
        key, draw = jax.random.split(key)
        token = sample(logits, draw, seen, sampling)
        return step + 1, token, decoding, seen, out, count, done, key

    p = prefilled
    carry = (0, p.token, p.decoding, p.seen, out, count, done, p.key)
    carry = jax.lax.while_loop(running, step_fn, carry)
    return carry[4], carry[5]


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new", "sampling", "eos_id", "pad_id", "stream")
)
def generate_tokens(
    graphdef: Any,
    state: Any,
    prompts: jax.Array,
    pad: jax.Array,
    key: jax.Array,
    *,
    max_new: int,
    sampling: SamplingConfig,
    eos_id: int | None = None,
    pad_id: int = 0,
    stream: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """New tokens for left-padded ``prompts``: :func:`prefill_tokens` then
    :func:`decode_tokens`, compiled together as one program (no host round trip between).

    Args:
        graphdef, state: the model split by ``nnx.split`` (with ``prefill`` and ``step``:
            :mod:`jaxtrain.models.decoding`).
        prompts: [B, T] int32, row b left-padded by ``pad[b]`` tokens.
        pad: [B] int32.
        key: PRNG key for sampling (unused when greedy).
        max_new: the most tokens to generate per row.
        sampling: how each token is picked.
        eos_id: a row stops after emitting it (None: never).
        pad_id: what a row emits after it has stopped.
        stream: send each step's tokens to the host as they are made (``streaming``).

    Returns:
        ([B, max_new] int32 tokens, [B] int32 count of tokens each row generated, its EOS
        included).
    """
    prefilled = prefill_tokens(
        graphdef, state, prompts, pad, key, max_new=max_new, sampling=sampling
    )
    return decode_tokens(
        graphdef, state, prefilled, max_new=max_new, sampling=sampling, eos_id=eos_id,
        pad_id=pad_id, stream=stream,
    )  # fmt: skip


def left_pad(prompts: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[Any, Any]:
    """([B, T] int32 left-padded prompts, [B] int32 padding per row), T the longest
    prompt rounded up to ``multiple`` (fewer distinct shapes, fewer compiles)."""
    longest = max(len(p) for p in prompts)
    length = -(-longest // multiple) * multiple
    rows = np.full((len(prompts), length), pad_id, np.int32)
    pad = np.zeros(len(prompts), np.int32)
    for i, prompt in enumerate(prompts):
        pad[i] = length - len(prompt)
        rows[i, pad[i] :] = prompt
    return rows, pad

"""The device side of serving: a fixed batch of decode rows and the programs that fill it.

The engine holds one KV cache of ``max_batch`` rows by ``slots`` positions
(:mod:`jaxtrain.models.kv_cache`) on the device for the server's whole life. A request
owns one row while it runs: its prompt is read into that row a chunk at a time
(:meth:`Engine.prefill`, each chunk a fixed bucket length), then every
:meth:`Engine.decode` call feeds one token to every row at that row's own slot, so rows
at different positions, admitted at different times, share each step. Rows without a
running request compute a token nobody reads, at a slot nothing reads.

Every program is compiled when the engine starts (one per prefill chunk length, one
decode step per row count: a step runs the first R rows, R the power of two that covers
the rows in use, so a lone request does not pay for a full batch): a new mix of requests
never recompiles. Tokens are picked on the device, per row:
greedy at temperature 0, else sampled after temperature and top-p, from a key folded from
the request's seed and the token's index, so a seeded request repeats its text.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtrain.generate.sampling import top_p_filter
from jaxtrain.models.kv_cache import CACHE_AXES, empty_cache


def pick(
    logits: jax.Array,
    seeds: jax.Array,
    index: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """Each row's next token [B] int32 from its logits [B, V]: the argmax where its
    ``temperature`` is 0, else a draw after temperature and ``top_p`` (per row, [B]) with
    the key of (``seeds[b]``, ``index[b]``)."""
    logits = logits.astype(jnp.float32)
    sampled = temperature > 0
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(seed, i, row):
        return jax.random.categorical(jax.random.fold_in(jax.random.PRNGKey(seed), i), row)

    def sample(logits):
        scaled = logits / jnp.where(sampled, temperature, 1.0)[:, None]
        # Sorting the vocabulary is most of the cost: only when a row asks for top-p.
        filtered = jax.lax.cond(
            jnp.any(sampled & (top_p < 1.0)),
            lambda x: top_p_filter(x, top_p[:, None]), lambda x: x, scaled,
        )  # fmt: skip
        draws = jax.vmap(draw)(seeds, index, filtered).astype(jnp.int32)
        return jnp.where(sampled, draws, greedy)

    # An all-greedy batch (the common case) skips sampling altogether.
    return jax.lax.cond(jnp.any(sampled), sample, lambda _: greedy, logits)


def _on_rows(cache: Any, first: jax.Array | int, count: int, decode) -> tuple[jax.Array, Any]:
    """``decode(part)`` on cache rows ``first .. first + count`` alone; returns its logits
    and the whole cache with those rows as it left them."""
    part = jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, first, count, axis=1), cache)
    logits, part = decode(part)
    cache = jax.tree.map(
        lambda c, p: jax.lax.dynamic_update_slice_in_dim(c, p, first, axis=1), cache, part
    )
    return logits, cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill_chunk(
    graphdef: Any,
    params: Any,
    cache: Any,
    row: jax.Array,
    tokens: jax.Array,
    start: jax.Array,
    last: jax.Array,
    sampling: tuple[jax.Array, jax.Array, jax.Array],
) -> tuple[jax.Array, Any]:
    """Feed ``tokens`` [1, C] at slots ``start ..`` of cache row ``row``; returns the token
    picked from the logits at chunk index ``last`` (the prompt's first new token when this
    is its final chunk) and the cache. ``sampling``: (seed, temperature, top_p) scalars."""
    model = nnx.merge(graphdef, params)
    logits, cache = _on_rows(
        cache, row, 1, lambda part: model.decode(tokens, part, start, jnp.zeros((1,), jnp.int32))
    )
    seed, temperature, top_p = (jnp.reshape(x, (1,)) for x in sampling)
    logits = jax.lax.dynamic_index_in_dim(logits[0], last, axis=0)  # [1, V]
    return pick(logits, seed, jnp.zeros((1,), jnp.int32), temperature, top_p)[0], cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def decode_rows(
    graphdef: Any,
    params: Any,
    cache: Any,
    tokens: jax.Array,
    slots: jax.Array,
    index: jax.Array,
    sampling: tuple[jax.Array, jax.Array, jax.Array],
) -> tuple[jax.Array, Any]:
    """Feed the first R rows' tokens ``tokens[b]`` [R] at their slots ``slots[b]``;
    returns each of those rows' next token [R] (the ``index[b]``-th it generates) and the
    cache. The rows past R are not touched: a step costs what its occupied rows need."""
    model = nnx.merge(graphdef, params)
    logits, cache = _on_rows(
        cache, 0, tokens.shape[0],
        lambda part: model.decode(tokens[:, None], part, slots, jnp.zeros_like(slots)),
    )  # fmt: skip
    seeds, temperature, top_p = sampling
    return pick(logits[:, 0], seeds, index, temperature, top_p), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "rows", "slots"))
def new_cache(graphdef: Any, params: Any, *, rows: int, slots: int) -> Any:
    """A zeroed cache of ``rows`` rows by ``slots`` positions, laid out on the device mesh
    as the model's sharding rules place :data:`~jaxtrain.models.kv_cache.CACHE_AXES`."""
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    cache = empty_cache(cfg.n_layers, rows, slots, cfg.n_kv_heads, cfg.head_dim, dtype)
    return jax.tree.map(lambda c: model.shard(c, CACHE_AXES), cache)


def halvings(largest: int, smallest: int) -> tuple[int, ...]:
    """``largest`` and its halvings down to ``smallest`` (or to ``largest`` itself when
    that is smaller), ascending: the bucket sizes of a shape that varies."""
    sizes = [largest]
    while sizes[-1] // 2 >= smallest:
        sizes.append(sizes[-1] // 2)
    return tuple(sorted(sizes))


class Engine:
    """The KV cache of ``max_batch`` rows and its compiled prefill and decode programs.

    Args:
        graphdef, params: the model split by ``nnx.split``.
        max_batch: decode rows (requests running at once).
        max_len: the most positions a request may use (prompt and new tokens).
        chunk: the longest prefill chunk.
    """

    def __init__(self, graphdef: Any, params: Any, *, max_batch: int, max_len: int,
                 chunk: int):  # fmt: skip
        self.graphdef, self.params = graphdef, params
        self.max_batch, self.max_len = max_batch, max_len
        self.buckets = halvings(chunk, 16)  # prefill chunk lengths
        self.row_buckets = halvings(max_batch, 1)  # decode steps over the first R rows
        # A spare chunk past max_len takes the padded tail of a prompt's last chunk.
        self.slots = max_len + self.buckets[-1]
        self.cache = new_cache(graphdef, params, rows=max_batch, slots=self.slots)
        self._prefill: dict[int, Any] = {}
        self._decode: dict[int, Any] = {}

    def compile(self) -> None:
        """Compile every program the server will run (one per prefill chunk length, one
        decode step per row count)."""
        i32, f32 = jnp.int32, jnp.float32
        scalar = jax.ShapeDtypeStruct((), i32)
        sampling = (scalar, jax.ShapeDtypeStruct((), f32), jax.ShapeDtypeStruct((), f32))
        for size in self.buckets:
            tokens = jax.ShapeDtypeStruct((1, size), i32)
            self._prefill[size] = prefill_chunk.lower(
                self.graphdef, self.params, self.cache, scalar, tokens, scalar, scalar, sampling
            ).compile()
        for size in self.row_buckets:
            rows = jax.ShapeDtypeStruct((size,), i32)
            floats = jax.ShapeDtypeStruct((size,), f32)
            self._decode[size] = decode_rows.lower(
                self.graphdef, self.params, self.cache, rows, rows, rows, (rows, floats, floats)
            ).compile()

    def bucket(self, remaining: int) -> int:
        """The chunk length for a prompt with ``remaining`` tokens still to read."""
        return next((b for b in self.buckets if b >= remaining), self.buckets[-1])

    def prefill(self, row: int, tokens: np.ndarray, start: int, sampling: tuple) -> int:
        """Read ``tokens`` (at most the longest bucket) into ``row`` at slots
        ``start ..``; returns the token picked after the last of them."""
        size = self.bucket(len(tokens))
        chunk = np.zeros((1, size), np.int32)
        chunk[0, : len(tokens)] = tokens
        seed, temperature, top_p = sampling
        token, self.cache = self._prefill[size](
            self.params, self.cache, np.int32(row), chunk, np.int32(start),
            np.int32(len(tokens) - 1),
            (np.int32(seed), np.float32(temperature), np.float32(top_p)),
        )  # fmt: skip
        return int(token)

    def decode(self, tokens: np.ndarray, slots: np.ndarray, index: np.ndarray,
               sampling: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:  # fmt: skip
        """One step of the first R rows (``len(tokens)``, a row bucket: the rows in use
        and the free ones below them): row b feeds ``tokens[b]`` at ``slots[b]``; returns
        each row's next token."""
        step = self._decode[len(tokens)]
        out, self.cache = step(self.params, self.cache, tokens, slots, index, sampling)
        return np.asarray(out)

    def rows_for(self, highest: int) -> int:
        """The row bucket a step needs when row ``highest`` is the last one in use."""
        return next(b for b in self.row_buckets if b > highest)

    @property
    def idle_slot(self) -> int:
        """A slot in the spare chunk: where a row without a decoding request writes, out
        of every request's sight."""
        return self.slots - 1

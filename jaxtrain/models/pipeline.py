"""Pipeline parallelism: the stacked layers split into ``S`` stages, and a batch's ``M``
microbatches flowing through them inside the one jitted step.

The rules table maps the stacked parameters' ``layers`` axis onto the pipeline mesh axis,
so stage ``s`` holds layers ``[s n/S, (s+1) n/S)`` of every stacked parameter (and their
optimizer state), and ``[n, ...]`` viewed as ``[S, n/S, ...]`` is each stage's slice where
it already lies. GPipe's schedule (Huang et al., 2019) is then written as one SPMD program,
as MaxText writes its pipeline: a buffer ``[S, mb, L, D]`` whose row ``s`` is what stage
``s`` works on, laid out over the stages, and a ``lax.scan`` of ``M + S - 1`` ticks. Each
tick

1. shifts the buffer one stage on (row ``s`` takes row ``s - 1``'s output: a roll along
   the stage dimension, which XLA turns into a collective-permute between neighbouring
   stages), row 0 taking the next microbatch;
2. runs every stage on its row at once: ``jax.vmap`` over the stage dimension of the
   stacked parameters, with ``spmd_axis_name`` the stage axis, so the activations'
   sharding constraints inside keep that dimension split; within a stage its layers are
   scanned and rematerialised as without pipelining, and fsdp, tensor and data split
   them as the rules say;
3. emits the last stage's row: microbatch ``t - (S - 1)`` is through every layer.

The circular schedule (``mesh.pipeline_repeats`` R > 1; Narayanan et al., 2021's
interleaved stages, MaxText's circular pipeline) cuts the layers into ``S R`` slices of
``c = n / (S R)``, slice ``r S + s`` held by stage ``s``, and sends every microbatch
through the stages R times: at tick ``t`` stage ``s`` runs pass ``(t - s) // M`` of
microbatch ``(t - s) mod M`` on its slice of that pass. What leaves the last stage in an
early pass reaches stage 0 by the same shift and waits there in a buffer [M, mb, L, D]
until stage 0 takes it ``M - S + 1`` ticks after it was made (so ``M >= S``). The stored
stack is ordered so that each stage's slices lie in its own rows (:func:`layer_order`);
checkpoints record the order, and parameters leave the training program in the model's
order.

Autodiff of the scan is the backward schedule: the ticks in reverse, the permutes
reversed. In the first and last ``S - 1`` ticks some stages have no microbatch and work on
stand-ins whose outputs are never used (the bubble): ``(S - 1) / (M R + S - 1)`` of all
stage-ticks (:func:`bubble_fraction`), which more microbatches or repeats shrink (a
stage-tick is then ``1 / R`` of a stage's layers). For the backward pass each device
keeps its stage's input of every tick, and what remat saves inside the stage:
activations of ``M + S - 1`` microbatches (``M R + S - 1`` inputs of ``1/R`` of the
layers when circular), where accumulation without pipelining holds one microbatch's at a
time.

Embedding and LM head stay outside the pipeline. The embedding runs on every stage (a
lookup); the pipeline's output, the last stage's rows, is split over the stages as well
as the batch axes (``head_batch``), so the LM head and loss, a large share of a step's
work at a large vocabulary, run once per row, not once per stage.

Shapes: B batch, M microbatches, mb = B / M rows each, L length, D model width, S stages,
K = n / S layers per stage, R repeats.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrain.sharding.local import ways
from jaxtrain.sharding.partition import ActivationSharding

# A stage's layers: (stacked layer parameters [K, ...], dropout keys [K, ...] or None,
# x [mb, L, D], per-microbatch args) -> (x, stats).
RunLayers = Callable[[Any, Any, jax.Array, tuple], tuple[jax.Array, Any]]


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The share of a (circular) schedule's stage-ticks that have no microbatch to work on."""
    return (stages - 1) / (microbatches * repeats + stages - 1)


def layer_order(n: int, stages: int, repeats: int) -> np.ndarray:
    """Which layer each row of the stored stack holds: ``order[i]`` is the model's layer
    at storage row ``i``. Stage ``s`` holds rows ``[s n/S, (s+1) n/S)``; in a circular
    schedule those are its ``repeats`` slices of ``c = n / (S R)`` layers, slice ``r``
    being layers ``[(r S + s) c, (r S + s + 1) c)``. With one repeat, the identity."""
    c = n // (stages * repeats)
    return np.arange(n).reshape(repeats, stages, c).swapaxes(0, 1).reshape(n)


def microbatch_count(rows: int, wanted: int, row_ways: int) -> int:
    """The most microbatches, at most ``wanted``, that split ``rows`` into equal parts
    each divisible by the ``row_ways`` devices the rows are split over (1 if none do)."""
    for m in range(wanted, 1, -1):
        if rows % m == 0 and (rows // m) % row_ways == 0:
            return m
    return 1


def split_rows(x: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...], microbatch i taking rows i, i+M, ...: a device's rows
    stay its own, spread evenly over the microbatches (the train step's accumulation
    splits its batch the same way), so splitting moves no data."""
    return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)


def _join(x: jax.Array) -> jax.Array:
    """The inverse of :func:`split_rows`."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def pipeline_blocks(
    run: RunLayers,
    layers: Any,
    x: jax.Array,
    args: tuple,
    *,
    n_layers: int,
    dropout_key: jax.Array | None,
    shard: ActivationSharding,
) -> jax.Array:
    """``x`` [B, L, D] through the ``n_layers`` stacked ``layers`` as a pipeline over the
    stages ``shard``'s rules split them into, in ``shard.pipeline_microbatches``
    microbatches (fewer when B does not split so; see :func:`microbatch_count`).

    Args:
        run: runs one stage's slice of the layers (:func:`jaxtrain.models.stack.run_layers`).
        layers: the stacked layers' parameters, [n, ...] each.
        x: the blocks' input.
        args: the blocks' other inputs, each [B, ...] (split into microbatches like x) or
            None.
        n_layers: n.
        dropout_key: one key for every (microbatch, layer), or None.
        shard: the model's activation sharding.
    """
    stages, repeats = shard.pipeline_stages(), shard.pipeline_repeats
    count = microbatch_count(x.shape[0], shard.pipeline_microbatches, ways(shard, "batch"))
    if repeats > 1 and count < stages:
        raise ValueError(
            f"a circular schedule needs at least as many microbatches as stages ({stages}); "
            f"the batch of {x.shape[0]} rows splits into {count}"
        )
    per = n_layers // (stages * repeats)
    staged = jax.tree.map(lambda a: a.reshape(stages, repeats, per, *a.shape[1:]), layers)
    keys = None
    if dropout_key is not None:
        keys = jax.random.split(dropout_key, (count, stages, repeats, per))

    def rows(a: jax.Array, lead: str | None) -> jax.Array:
        """``a`` [lead, mb, L, ...] laid out: lead over the stages or whole, rows and
        length as everywhere."""
        return shard(a, (lead, "batch", "length", *(None,) * (a.ndim - 3)))

    def filed(a: jax.Array) -> jax.Array:
        """The circular schedule's buffer [S, M, mb, L, D] laid out: a slab per stage."""
        return shard(a, ("layers", None, "batch", "length", None))

    feed = rows(split_rows(x, count), None)  # [M, mb, L, D]
    per_mb = tuple(None if a is None else split_rows(a, count) for a in args)

    def stage(
        layers: Any, repeat: jax.Array, x: jax.Array, args: tuple, keys: jax.Array | None
    ) -> jax.Array:
        if repeats == 1:
            chunk = jax.tree.map(lambda a: a[0], layers)
        else:  # this pass's slice of the stage's layers: an index into its own rows
            pick = functools.partial(jax.lax.dynamic_index_in_dim, index=repeat, keepdims=False)
            chunk = jax.tree.map(pick, layers)
        return run(chunk, keys, x, args)[0]

    every_stage = jax.vmap(stage, spmd_axis_name=shard.rules.lookup("layers"))
    stage_index = jnp.arange(stages)

    def tick(carry: tuple, t: jax.Array) -> tuple[tuple, jax.Array]:
        buffer, loop = carry
        progress = t - stage_index  # how many microbatch-passes each stage has begun
        index = jnp.clip(progress, 0, None) % count  # each stage's microbatch
        repeat = jnp.clip(progress // count, 0, repeats - 1)  # and which pass of it
        # Stage s takes stage s-1's output; stage 0 the next microbatch (past the last
        # one it takes the last again, whose output never reaches the end).
        rolled = jnp.roll(buffer, 1, axis=0)
        fresh = feed[jnp.minimum(t, count - 1)]
        if loop is None:
            shifted = rolled.at[0].set(fresh)
        else:
            # In a later pass stage 0 takes the microbatch's output of the last stage,
            # which the roll brought it a tick after it was made: each stage files its
            # rolled row in its own slab of ``loop`` [S, M, ...] (only stage 0's is ever
            # read), so nothing but the roll crosses between stages.
            made = jnp.clip(t - stages, 0, None) % count  # the last stage's at t - 1
            loop = filed(loop.at[:, made].set(rolled))
            first = jnp.where(t < count, fresh[None], loop[:, t % count])
            shifted = jnp.where((stage_index == 0)[:, None, None, None], first, rolled)
        stage_args = tuple(None if a is None else rows(a[index], "layers") for a in per_mb)
        stage_keys = None if keys is None else keys[index, stage_index, repeat]
        out = every_stage(staged, repeat, rows(shifted, "layers"), stage_args, stage_keys)
        out = rows(out, "layers")
        return (out, loop), out[-1]

    buffer = rows(jnp.zeros((stages, *feed.shape[1:]), x.dtype), "layers")
    loop = None if repeats == 1 else filed(jnp.zeros((stages, *feed.shape), x.dtype))
    ticks = count * repeats + stages - 1
    _, done = jax.lax.scan(tick, (buffer, loop), jnp.arange(ticks))
    return shard(_join(done[ticks - count :]), ("head_batch", "length", "act_embed"))

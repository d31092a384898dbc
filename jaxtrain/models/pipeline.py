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

Autodiff of the scan is the backward schedule: the ticks in reverse, the permutes
reversed. In the first and last ``S - 1`` ticks some stages have no microbatch and work on
zeros that are never used (the bubble): ``(S - 1) / (M + S - 1)`` of all stage-ticks
(:func:`bubble_fraction`), which more microbatches shrink. For the backward pass each
device keeps its stage's input of every tick, and what remat saves inside the stage:
activations of ``M + S - 1`` microbatches, where accumulation without pipelining holds
one microbatch's at a time.

Embedding and LM head stay outside the pipeline. The embedding runs on every stage (a
lookup); the pipeline's output, the last stage's rows, is split over the stages as well
as the batch axes (``head_batch``), so the LM head and loss, a large share of a step's
work at a large vocabulary, run once per row, not once per stage.

Shapes: B batch, M microbatches, mb = B / M rows each, L length, D model width, S stages,
K = n / S layers per stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxtrain.sharding.local import ways
from jaxtrain.sharding.partition import ActivationSharding

# A stage's layers: (stacked layer parameters [K, ...], dropout keys [K, ...] or None,
# x [mb, L, D], per-microbatch args) -> (x, stats).
RunLayers = Callable[[Any, Any, jax.Array, tuple], tuple[jax.Array, Any]]


def bubble_fraction(stages: int, microbatches: int) -> float:
    """The share of a GPipe schedule's stage-ticks that have no microbatch to work on."""
    return (stages - 1) / (microbatches + stages - 1)


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
    stages = shard.pipeline_stages()
    count = microbatch_count(x.shape[0], shard.pipeline_microbatches, ways(shard, "batch"))
    per = n_layers // stages
    staged = jax.tree.map(lambda a: a.reshape(stages, per, *a.shape[1:]), layers)
    keys = None if dropout_key is None else jax.random.split(dropout_key, (count, stages, per))

    def rows(a: jax.Array, lead: str | None) -> jax.Array:
        """``a`` [lead, mb, L, ...] laid out: lead over the stages or whole, rows and
        length as everywhere."""
        return shard(a, (lead, "batch", "length", *(None,) * (a.ndim - 3)))

    feed = rows(split_rows(x, count), None)  # [M, mb, L, D]
    per_mb = tuple(None if a is None else split_rows(a, count) for a in args)

    def stage(layers: Any, x: jax.Array, args: tuple, keys: jax.Array | None) -> jax.Array:
        return run(layers, keys, x, args)[0]

    every_stage = jax.vmap(stage, spmd_axis_name=shard.rules.lookup("layers"))
    stage_index = jnp.arange(stages)

    def tick(buffer: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Stage s takes stage s-1's output, stage 0 the next microbatch (past the last
        # one it takes the last again, whose output never reaches the end).
        shifted = jnp.roll(buffer, 1, axis=0).at[0].set(feed[jnp.minimum(t, count - 1)])
        index = jnp.clip(t - stage_index, 0, count - 1)  # each stage's microbatch
        stage_args = tuple(None if a is None else rows(a[index], "layers") for a in per_mb)
        stage_keys = None if keys is None else keys[index, stage_index]
        out = rows(every_stage(staged, rows(shifted, "layers"), stage_args, stage_keys), "layers")
        return out, out[-1]

    buffer = rows(jnp.zeros((stages, *feed.shape[1:]), x.dtype), "layers")
    _, done = jax.lax.scan(tick, buffer, jnp.arange(count + stages - 1))
    return shard(_join(done[stages - 1 :]), ("head_batch", "length", "act_embed"))

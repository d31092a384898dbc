"""Stacked, scanned layers: build ``n`` blocks as one module whose parameters carry a
leading ``layers`` axis, and run them with ``jax.lax.scan``, each block rematerialised
per ``model.remat`` (Chen et al., 2016; BMTrain's CheckpointBlock; the policies are in
``models/remat.py``). Compile time does not
grow with depth.

Dimensions: B batch, L length, D model width.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config import ModelConfig
from jaxtrain.models.kv_cache import CACHE_AXES
from jaxtrain.models.pipeline import pipeline_blocks
from jaxtrain.models.remat import POLICIES
from jaxtrain.sharding.memory import on_device
from jaxtrain.sharding.partition import ActivationSharding


def stacked(make_block: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """``n`` blocks made by a vmapped ``make_block``: one module, parameters [n, ...]."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> nnx.Module:
        return make_block(rngs)

    return make(rngs)


def scan_blocks(
    blocks: nnx.Module,
    x: jax.Array,
    *args: Any,
    cfg: ModelConfig,
    dropout_key: jax.Array | None,
    shard: Any = None,
) -> jax.Array:
    """``x`` [B, L, D] through the ``cfg.n_layers`` stacked blocks, each called as
    ``block(x, *args, key)`` with its own dropout key (None when not training). Blocks
    that return ``(x, stats)`` (a tree of per-layer arrays) give ``(x, stats)``, each
    stats array stacked over the layers [n, ...].

    The first ``cfg.remat_layers()`` blocks are rematerialised per ``cfg.remat`` and the
    rest save everything (InternEvo's ``checkpoint: 0.5``): two scans over the two
    slices of the stacked layers, so memory and recomputation sit between the two
    policies. Stacked parameters in host memory (offloaded) are copied to the device one
    layer at a time, inside the scan. When ``shard`` (the model's activation sharding)
    splits the layers over pipeline stages, the blocks run as a pipeline
    (:func:`jaxtrain.models.pipeline.pipeline_blocks`); ``args`` must then be arrays
    with the batch first, or None.
    """
    graphdef, layers = nnx.split(blocks)
    if isinstance(shard, ActivationSharding) and shard.pipeline_stages() > 1:
        return pipeline_blocks(
            functools.partial(run_layers, graphdef, remat=cfg.remat),
            layers, x, args, n_layers=cfg.n_layers, dropout_key=dropout_key, shard=shard,
        )  # fmt: skip
    n, remat, k = cfg.n_layers, cfg.remat, cfg.remat_layers()
    keys = None if dropout_key is None else jax.random.split(dropout_key, n)
    if remat == "none" or k in (0, n):
        x, stats = run_layers(graphdef, layers, keys, x, args, remat=remat if k else "none")
    else:
        head = jax.tree.map(lambda a: a[:k], (layers, keys))
        tail = jax.tree.map(lambda a: a[k:], (layers, keys))
        x, first = run_layers(graphdef, *head, x, args, remat=remat)
        x, rest = run_layers(graphdef, *tail, x, args, remat="none")
        stats = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, rest)
    return x if stats is None else (x, stats)


def run_layers(
    graphdef: Any, layers: Any, keys: jax.Array | None, x: jax.Array, args: tuple, *, remat: str
) -> tuple[jax.Array, Any]:
    """``x`` through the stacked ``layers`` (split from a stacked module, ``graphdef``) in
    one ``lax.scan``, each layer rematerialised by the policy ``remat``: (x, per-layer
    stats or None)."""

    def body(x, layer):
        layer_state, key = layer
        # Offloaded parameters come to the device a layer at a time (and, under remat,
        # again for the backward pass); elsewhere this is no copy at all.
        block = nnx.merge(graphdef, on_device(layer_state))
        out = block(x, *args, key)
        return out if isinstance(out, tuple) else (out, None)

    if remat != "none":
        body = jax.checkpoint(body, policy=POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(body, x, (layers, keys))


def scan_decode(
    blocks: nnx.Module, x: jax.Array, cache: Any, *args: Any, shard: Callable[..., jax.Array]
) -> tuple[jax.Array, Any]:
    """``x`` [B, L, D] through the ``n`` stacked blocks in incremental decoding, each
    called as ``block.decode(x, cache, layer, *args)`` with the whole stacked ``cache``
    (KV caches [layers, B, K, S, H]) and its own index ``layer``; returns x and the
    updated cache. ``shard`` (the model's activation constraint) lays the cache out by
    :data:`~jaxtrain.models.kv_cache.CACHE_AXES` going in and coming out.

    The cache is carried through the scan rather than sliced as its input: a block writes
    only its new entries, in place, and reads its layer's slice where it uses it, so no
    layer's cache is copied whole per step.
    """
    graphdef, layers = nnx.split(blocks)
    cache = jax.tree.map(lambda c: shard(c, CACHE_AXES), cache)
    n = jax.tree.leaves(cache)[0].shape[0]

    def body(carry, layer):
        x, cache = carry
        layer_state, index = layer
        block = nnx.merge(graphdef, layer_state)
        return block.decode(x, cache, index, *args), None

    (x, cache), _ = jax.lax.scan(body, (x, cache), (layers, jnp.arange(n)))
    return x, jax.tree.map(lambda c: shard(c, CACHE_AXES), cache)

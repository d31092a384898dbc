"""The mixture-of-experts terms of the training loss, and the routing metrics.

A model with experts returns each layer's router statistics
(:mod:`jaxtrain.models.moe`). :func:`router_sums` turns them into sums over a batch's
counted tokens, so that microbatches add up like the token loss does: the step
accumulates them, adds :func:`penalty` to the summed token loss it differentiates, and
reports :func:`router_metrics`. A dense model has no statistics and every function here
returns nothing for it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtrain.config import MoEConfig

Sums = dict[str, jax.Array]


def router_sums(stats: dict[str, jax.Array], count: jax.Array) -> Sums:
    """Additive sums of per-layer ``stats`` for a batch of ``count`` counted tokens: the
    layer-mean balance and z-losses times ``count``, and the loads [layers, E] and
    dropped assignments as they are."""
    if not stats:
        return {}
    return {
        "balance": jnp.mean(stats["balance"]) * count,
        "z": jnp.mean(stats["z"]) * count,
        "load": stats["load"],
        "dropped": jnp.sum(stats["dropped"]),
    }


def penalty(sums: Sums, cfg: MoEConfig | None) -> jax.Array | float:
    """What the auxiliary losses add to the summed token loss (0 without experts)."""
    if not sums or cfg is None:
        return 0.0
    return cfg.balance_weight * sums["balance"] + cfg.z_weight * sums["z"]


def router_metrics(sums: Sums, count: jax.Array) -> dict[str, jax.Array]:
    """``moe_balance_loss`` and ``moe_z_loss`` (per token, averaged over the layers);
    ``moe_load_min``/``moe_load_max``: the least and most loaded expert of any layer as
    a multiple of an even share (1 is perfectly balanced); ``moe_dropped``: the share of
    assignments dropped by the capacity limit."""
    if not sums:
        return {}
    load = sums["load"]
    computed = jnp.sum(load, axis=-1, keepdims=True)
    share = load * load.shape[-1] / jnp.maximum(computed, 1.0)
    return {
        "moe_balance_loss": sums["balance"] / count,
        "moe_z_loss": sums["z"] / count,
        "moe_load_min": jnp.min(share),
        "moe_load_max": jnp.max(share),
        "moe_dropped": sums["dropped"] / jnp.maximum(jnp.sum(computed) + sums["dropped"], 1.0),
    }

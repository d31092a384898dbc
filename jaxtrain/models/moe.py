"""Mixture-of-experts feed-forward: a top-k softmax router over SwiGLU experts, dropless.

Each token's router scores are a float32 softmax over the E experts; the token goes to
its k best, weighted by their probabilities, renormalised to sum to 1 when configured
(Mixtral, Jiang et al., 2024; Qwen3-MoE). The computation is dropless (MegaBlocks,
Gale et al., 2023): the T x k (token, expert) assignments are sorted by expert and each
projection is one grouped matmul over the sorted rows (``jax.lax.ragged_dot``, which XLA
lowers on CPU, GPU and TPU), so no token is padded, dropped or multiplied by an expert
it did not pick. With a capacity factor, GShard's rule (Lepikhin et al., 2021) drops
the assignments past each expert's capacity, in token order, and counts them.

Per layer it reports, for the loss and the metrics (summed over every device's tokens):

- ``balance``: the load-balancing loss of Switch (Fedus et al., 2022) in the form HF
  Mixtral computes, E x sum_e f_e P_e, with f_e the assignments to expert e per token
  and P_e its mean router probability; k for a perfectly even router.
- ``z``: the router z-loss of ST-MoE (Zoph et al., 2022), the mean squared log-sum-exp
  of the router logits.
- ``load``: assignments each expert computed [E]; ``dropped``: assignments dropped.

Under a mesh the routing runs per device on its own tokens (``per_shard``), whose
totals are summed over the devices that split the batch and the sequence. Each device
holds E / ``mesh.expert`` of the experts (tokens travel to them and back all-to-all);
their weights are gathered over D inside the layer, so the gradients are
reduce-scattered per layer, and their width stays split under tensor parallelism, each
device computing its share of every expert.

Dimensions: B batch, L length, D model width, E experts, k experts per token, F an
expert's width, T tokens (B x L), A assignments (T x k).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.config import MoEConfig
from jaxtrain.models.layers import MLP, Shard, param
from jaxtrain.sharding.local import exchange as all_to_all
from jaxtrain.sharding.local import gather, mesh_sum, per_shard, ways

Stats = dict[str, jax.Array]


def route(logits: jax.Array, k: int, renormalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(weights [T, k] float32, experts [T, k] int32, probabilities [T, E]) of float32
    router ``logits`` [T, E]: the k most probable experts, best first (ties: the lower
    index first), and their probabilities, renormalised to sum to 1 if asked."""
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def capacity(tokens: int, k: int, experts: int, factor: float) -> int:
    """The most assignments one expert computes of ``tokens`` tokens; 0 factor: all."""
    return tokens * k if factor <= 0 else max(1, math.ceil(factor * tokens * k / experts))


def _rank_in_group(groups: jax.Array, n_groups: int) -> jax.Array:
    """For each element of int ``groups`` [A], how many earlier elements share its group."""
    order = jnp.argsort(groups, stable=True)
    sizes = jnp.bincount(groups, length=n_groups)
    starts = jnp.cumsum(sizes) - sizes
    ranks = jnp.arange(groups.shape[0]) - starts[groups[order]]
    return jnp.zeros_like(ranks).at[order].set(ranks)


def _grouped_swiglu(
    rows: jax.Array,
    ids: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    dtype: jnp.dtype,
) -> jax.Array:
    """Row ``i`` of ``rows`` [R, D] through expert ``ids[i]`` of the stacked weights
    [G, ...], by grouped matmuls over the rows sorted by expert; an id of G or more is
    padding and gives zeros."""
    n_groups = w_gate.shape[0]
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.bincount(ids, length=n_groups).astype(jnp.int32)  # padding: no group
    sorted_rows = rows[order]
    gate = jax.lax.ragged_dot(sorted_rows, w_gate.astype(dtype), sizes)
    up = jax.lax.ragged_dot(sorted_rows, w_up.astype(dtype), sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down.astype(dtype), sizes)
    return jnp.zeros_like(out).at[order].set(out)


def expert_ffn(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    dtype: jnp.dtype,
    limit: int,
    exchange: Callable[[jax.Array], jax.Array] | None = None,
    devices: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """The experts' weighted sum for each token, and which assignments were kept.

    The kept assignments are laid out in a buffer per destination device (each device
    holding E / ``devices`` consecutive experts), exchanged all-to-all, computed by the
    receiving device's experts, and exchanged back; with one device the exchange is the
    identity and the buffer a permutation. A buffer holds every assignment a device may
    send one destination: all of them when dropless, at most its experts' capacity
    otherwise.

    Args:
        x: [T, D] tokens.
        experts: [T, k] each token's experts (of all E).
        weights: [T, k] float32 their weights.
        w_gate, w_up: [E / devices, D, F]; w_down: [E / devices, F, D], this device's
            experts (cast to ``dtype`` for the matmuls).
        dtype: the compute dtype.
        limit: the most assignments an expert keeps (:func:`capacity`), earlier tokens
            first.
        exchange: the all-to-all among the ``devices`` that split the experts
            (:func:`jaxtrain.sharding.local.exchange`); None with one.
        devices: how many devices split the experts.

    Returns:
        ([T, D] in ``dtype``, [T, k] bool: the assignment was computed, not dropped).
    """
    t, k = experts.shape
    local = w_gate.shape[0]
    flat = experts.reshape(-1)  # [A], token-major: token i's assignments at i k ...
    assignments = flat.shape[0]
    kept = jnp.ones(assignments, bool)
    if limit < assignments:
        kept = _rank_in_group(flat, local * devices) < limit
    dest = flat // local
    # Slot in the destination's buffer: kept assignments first, in token order.
    slot = _rank_in_group(dest * 2 + (~kept).astype(dest.dtype), 2 * devices)
    width = min(assignments, local * limit)
    slot = jnp.where(kept, slot, width)  # out of range: not sent
    rows = x[jnp.arange(assignments) // k].astype(dtype)
    send = jnp.zeros((devices, width, x.shape[-1]), dtype)
    send = send.at[dest, slot].set(rows, mode="drop")
    ids = jnp.full((devices, width), local, flat.dtype)
    ids = ids.at[dest, slot].set(flat % local, mode="drop")
    exchange = exchange or (lambda a: a)
    got, got_ids = exchange(send), exchange(ids)
    out = _grouped_swiglu(
        got.reshape(-1, x.shape[-1]), got_ids.reshape(-1), w_gate, w_up, w_down, dtype
    )
    back = exchange(out.reshape(devices, width, -1))
    out = back.at[dest, slot].get(mode="fill", fill_value=0).reshape(t, k, -1)
    combine = jnp.where(kept.reshape(t, k), weights, 0.0)
    y = jnp.einsum("TkD,Tk->TD", out.astype(jnp.float32), combine)
    return y.astype(dtype), kept.reshape(t, k)


def router_stats(
    logits: jax.Array,
    probs: jax.Array,
    experts: jax.Array,
    kept: jax.Array,
    total: Callable[[Stats], Stats],
) -> Stats:
    """The layer's ``balance``, ``z``, ``load`` and ``dropped`` (module docstring) over
    every device's tokens: ``total`` sums a tree over the devices that split them."""
    n_experts = probs.shape[-1]
    assigned = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32)  # [T, k, E]
    sums = total(
        {
            "tokens": jnp.asarray(logits.shape[0], jnp.float32),
            "assigned": jnp.sum(assigned, axis=(0, 1)),
            "load": jnp.sum(assigned * kept[..., None], axis=(0, 1)),
            "probs": jnp.sum(probs, axis=0),
            "z": jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
        }
    )
    fraction = jax.lax.stop_gradient(sums["assigned"]) / sums["tokens"]
    balance = n_experts * jnp.sum(fraction * sums["probs"] / sums["tokens"])
    return {
        "balance": balance,
        "z": sums["z"] / sums["tokens"],
        "load": sums["load"],
        "dropped": jnp.sum(sums["assigned"]) - jnp.sum(sums["load"]),
    }


class MoE(nnx.Module):
    """Top-k routed SwiGLU experts (and optional shared experts); ``__call__`` returns
    the output and the layer's router statistics."""

    def __init__(
        self,
        d_model: int,
        cfg: MoEConfig,
        *,
        out_std: float,
        param_dtype: jnp.dtype,
        compute_dtype: jnp.dtype,
        shard: Shard,
        rngs: nnx.Rngs,
    ):
        e, f = cfg.num_experts, cfg.expert_mlp_dim
        init, out_init = nnx.initializers.normal(0.02), nnx.initializers.normal(out_std)
        self.router = param(rngs, init, (d_model, e), ("embed", "router"), param_dtype)
        self.w_gate = param(rngs, init, (e, d_model, f), ("exp", "embed", "mlp"), param_dtype)
        self.w_up = param(rngs, init, (e, d_model, f), ("exp", "embed", "mlp"), param_dtype)
        self.w_down = param(rngs, out_init, (e, f, d_model), ("exp", "mlp", "embed"), param_dtype)
        self.shared = None
        if cfg.shared_experts:
            self.shared = MLP(
                d_model,
                cfg.shared_experts * f,
                out_std=out_std,
                param_dtype=param_dtype,
                compute_dtype=compute_dtype,
                shard=shard,
                rngs=rngs,
            )
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.shard = shard

    def __call__(self, x: jax.Array) -> tuple[jax.Array, Stats]:
        """``x`` [B, L, D] -> (output [B, L, D], this layer's router statistics)."""
        cfg, dt = self.cfg, self.compute_dtype
        tokens_total = mesh_sum(self.shard, "batch", "length")  # identities without a mesh
        exchange, devices = all_to_all(self.shard, "exp"), ways(self.shard, "exp")
        # The experts' weights come in split over D as the preset shards them and are
        # gathered here, so their gradients are reduce-scattered per layer.
        whole_in, whole_out = gather(self.shard, "embed", 1), gather(self.shard, "embed", 2)
        total_mlp = mesh_sum(self.shard, "mlp")

        def local(x, router, w_gate, w_up, w_down):
            b, length, d = x.shape
            flat = x.reshape(b * length, d)
            logits = jnp.einsum("TD,DE->TE", flat.astype(jnp.float32), router.astype(jnp.float32))
            weights, experts, probs = route(logits, cfg.experts_per_token, cfg.renormalize)
            limit = capacity(
                b * length, cfg.experts_per_token, cfg.num_experts, cfg.capacity_factor
            )
            w_gate, w_up, w_down = whole_in(w_gate), whole_in(w_up), whole_out(w_down)
            y, kept = expert_ffn(
                flat, experts, weights, w_gate, w_up, w_down, dt, limit, exchange, devices
            )
            stats = router_stats(logits, probs, experts, kept, tokens_total)
            return total_mlp(y).reshape(b, length, d), stats

        acts = ("batch", "length", None)
        stats_axes = {"balance": (), "z": (), "load": (None,), "dropped": ()}
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        shapes = {
            "balance": scalar,
            "z": scalar,
            "load": jax.ShapeDtypeStruct((cfg.num_experts,), jnp.float32),
            "dropped": scalar,
        }
        y, stats = per_shard(
            local,
            self.shard,
            (
                acts,
                (None, None),
                ("exp", "embed", "mlp"),
                ("exp", "embed", "mlp"),
                ("exp", "mlp", "embed"),
            ),
            (acts, stats_axes),
            out_shapes=(x, shapes),
        )(x, self.router[...], self.w_gate[...], self.w_up[...], self.w_down[...])
        y = self.shard(y, ("batch", "length", "act_embed"))
        if self.shared is not None:
            y = y + self.shared(x)
        return y, stats

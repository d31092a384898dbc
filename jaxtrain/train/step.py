"""The pure training and evaluation steps.

``train_step(state, batch) -> (state, metrics)`` is the whole update: forward, backward,
gradient accumulation over microbatches (a ``lax.scan``, not a Python loop), clipping and
the AdamW update. Accumulation keeps its sum laid out like the parameters, or, with
:class:`LocalAccumulation`, each batch shard's sum on that shard's devices
(:mod:`jaxtrain.sharding.batch_shards`), reduced once per step. The loss forms the
logits a chunk of positions at a time (:mod:`jaxtrain.train.loss`). It does no host
work; the loop jits it once with explicit shardings.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtrain.config import LossScaleConfig
from jaxtrain.models.dense import weight_gradients_in
from jaxtrain.models.pipeline import split_rows
from jaxtrain.sharding.context import zigzag_batch
from jaxtrain.sharding.grad_comm import reduce_shards
from jaxtrain.sharding.memory import on_device
from jaxtrain.train import fp8_history, loss_scale
from jaxtrain.train.loss import chunk_count, chunked_cross_entropy_sum
from jaxtrain.train.moe_loss import Sums, penalty, router_metrics, router_sums
from jaxtrain.train.offload import fetch, store, streamed
from jaxtrain.train.optim import schedule_count
from jaxtrain.train.state import ModelSpec, TrainState

Batch = dict[str, jax.Array]


def model_inputs(batch: Batch) -> dict[str, jax.Array | None]:
    """The model's keyword inputs in a batch: the documents' positions and segment ids
    (None unless packed) and, for an encoder-decoder, the decoder's inputs."""
    kwargs = {"positions": batch.get("positions"), "segment_ids": batch.get("segment_ids")}
    if "decoder_inputs" in batch:
        kwargs["decoder_inputs"] = batch["decoder_inputs"]
    return kwargs


def _split_microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...], microbatch m taking rows m, m+n, m+2n, ...
    (:func:`~jaxtrain.models.pipeline.split_rows`: no data moves)."""
    return jax.tree.map(lambda x: split_rows(x, n), batch)


@dataclasses.dataclass(frozen=True)
class LocalAccumulation:
    """Local gradient accumulation: ``spec`` is the model traced for one batch shard's
    rows (no constraint names the batch axes), vmapped over ``shards`` shards laid over
    the mesh axes ``axes``; ``shardings`` lays out the ``[shards, *shape]`` gradient
    sums."""

    spec: ModelSpec
    shards: int
    axes: tuple[str, ...]
    shardings: Any


def _per_shard_microbatches(batch: Batch, shards: int, n: int) -> Batch:
    """[B, ...] -> [n, shards, B/(shards n), ...]: shard s holds rows s B/shards .. as the
    batch sharding does, and microbatch m takes its rows m, m+n, ... (the same rows
    :func:`_split_microbatches` gives microbatch m)."""

    def split(x):
        x = x.reshape(shards, x.shape[0] // (shards * n), n, *x.shape[1:])
        return jnp.moveaxis(x, 2, 0)

    return jax.tree.map(split, batch)


def _loss_sum(
    spec: ModelSpec,
    params: Any,
    batch: Batch,
    key: jax.Array | None,
    chunk_tokens: int,
    row_shards: int,
) -> tuple[jax.Array, jax.Array, Sums]:
    """(summed token loss, token count, router sums) of ``batch``, its logits formed for
    at most ``chunk_tokens`` tokens per device at a time (0: all at once), its rows split
    over ``row_shards`` devices. The router sums (:mod:`jaxtrain.train.moe_loss`) are
    empty for a dense model."""
    if spec.sequence_ways > 1:  # the sequence split over devices, two chunks each
        batch = zigzag_batch(batch, spec.sequence_ways)
    kwargs = model_inputs(batch) | ({"with_stats": True} if spec.moe is not None else {})
    out = spec.apply(params, batch["inputs"], dropout_key=key, return_hidden=True, **kwargs)
    (hidden, head), stats = out if spec.moe is not None else (out, {})
    targets, weights = batch["targets"], batch.get("weights")
    rows, length = targets.shape
    ways = spec.sequence_ways  # each device holds length / ways positions of its rows
    chunks = chunk_count(-(-rows // row_shards), length // ways, chunk_tokens)
    loss_sum, count = chunked_cross_entropy_sum(
        hidden,
        head,
        targets,
        weights,
        chunks=chunks,
        row_shards=row_shards,
        sequence_shards=ways,
        # After a pipeline the rows are split over its stages too (models/pipeline.py).
        row_axis="head_batch" if spec.stages > 1 else "batch",
    )
    return loss_sum, count, router_sums(stats, count)


def make_train_step(
    spec: ModelSpec,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    microbatches: int = 1,
    skip_nonfinite: bool = False,
    loss_chunk_tokens: int = 0,
    row_shards: int = 1,
    local: LocalAccumulation | None = None,
    scaling: LossScaleConfig | None = None,
    offload: Any = None,
    offload_params: Any = None,
    grad_comm: str = "float32",
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build the pure step for a model, an optimizer and an accumulation count.

    With ``skip_nonfinite`` a step whose loss or gradient norm is NaN/Inf leaves the
    parameters and optimizer state as they were and counts itself in ``state.skipped``.
    With ``loss_chunk_tokens`` the loss forms the logits of at most that many tokens per
    device at a time (:func:`jaxtrain.train.loss.chunked_cross_entropy_sum`), given that
    a batch's rows are split over ``row_shards`` devices. With ``local`` (and several
    microbatches) each batch shard accumulates its own gradients, reduced once per step.
    With ``scaling`` the loss is scaled dynamically (:mod:`jaxtrain.train.loss_scale`):
    ``state.loss_scale`` multiplies it before the backward pass and divides the gradients
    after, and a step whose gradients are not finite drops its update and lowers the
    scale. With ``offload`` (the optimizer state's shardings) the state arrives in host
    memory, is read onto the devices for the update and leaves in host memory again;
    with ``offload_params`` (the parameters' shardings) so do the parameters, read onto
    the devices as :func:`jaxtrain.train.offload.streamed` says (a layer at a time),
    and whole for the update.
    ``grad_comm`` (``train.grad_comm_dtype``) is what gradients cross devices in: with
    ``local`` the step's reduction (:mod:`jaxtrain.sharding.grad_comm`), else the weight
    matmuls' gradients (:func:`jaxtrain.models.dense.weight_gradients_in`).
    """
    # Float8 projections' amax histories: "gradients" that are the amaxes seen.
    histories = fp8_history.mask(spec.logical)
    # Without local accumulation the reductions follow the weight matmuls' gradients.
    matmul_grads = jnp.bfloat16 if grad_comm == "bfloat16" and local is None else jnp.float32

    def grad_fn(params, batch, key, scale, spec=spec, row_shards=row_shards):
        """(float32 grads of the summed loss, plus any experts' auxiliary losses, times
        ``scale``; summed token loss; token count; router sums); ``scale`` None
        multiplies by nothing."""

        def loss_fn(params):
            loss_sum, count, sums = _loss_sum(
                spec, params, batch, key, loss_chunk_tokens, row_shards
            )
            objective = loss_sum + penalty(sums, spec.moe)
            scaled = objective if scale is None else objective * scale
            return scaled, (loss_sum, count, sums)

        with weight_gradients_in(matmul_grads):
            value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
            (_, (loss_sum, count, sums)), grads = value_and_grad(params)
        # Streamed (offloaded) layers' gradients come back in host memory.
        grads = on_device(grads)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), loss_sum, count, sums

    def zero_sums(fn, *args):
        """Zeros shaped like the router sums ``fn(*args)`` returns (last), untraced."""
        shapes = jax.eval_shape(fn, *args)[-1] if spec.moe is not None else {}
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def local_grads_and_loss(params, batch, key, scale):
        """Each batch shard's gradient sum stays on its devices until the last microbatch."""
        shard_grads = jax.vmap(
            functools.partial(grad_fn, scale=scale, spec=local.spec, row_shards=1),
            in_axes=(None, 0, 0),
            spmd_axis_name=local.axes,
        )

        def accumulate(carry, xs):
            grads, loss_sum, count, sums = carry
            mb, index = xs
            keys = jax.random.split(jax.random.fold_in(key, index), local.shards)
            g, l, c, s = shard_grads(params, mb, keys)
            grads = jax.tree.map(jnp.add, grads, g)
            grads = jax.lax.with_sharding_constraint(grads, local.shardings)
            sums = jax.tree.map(lambda a, b: a + jnp.sum(b, axis=0), sums, s)
            return (grads, loss_sum + jnp.sum(l), count + jnp.sum(c), sums), None

        zeros = jax.tree.map(lambda p: jnp.zeros((local.shards, *p.shape), jnp.float32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, local.shardings)
        xs = (_per_shard_microbatches(batch, local.shards, microbatches), jnp.arange(microbatches))
        # No router sums: config refuses local accumulation for a mixture of experts.
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), {})
        (grads, loss_sum, count, sums), _ = jax.lax.scan(accumulate, init, xs)
        if grad_comm != "float32":
            grads = reduce_shards(grads, local.shardings, spec.param_shardings, grad_comm)
        else:
            grads = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
        grads = jax.lax.with_sharding_constraint(grads, spec.param_shardings)
        return grads, loss_sum, count, sums

    def grads_and_loss(params, batch, key, scale):
        if local is not None:
            return local_grads_and_loss(params, batch, key, scale)
        if microbatches == 1:
            return grad_fn(params, batch, key, scale)

        def accumulate(carry, xs):
            grads, loss_sum, count, sums = carry
            mb, index = xs
            g, l, c, s = grad_fn(params, mb, jax.random.fold_in(key, index), scale)
            grads = fp8_history.combine(histories, grads, g)
            if spec.param_shardings is not None:
                grads = jax.lax.with_sharding_constraint(grads, spec.param_shardings)
            return (grads, loss_sum + l, count + c, jax.tree.map(jnp.add, sums, s)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        xs = (_split_microbatches(batch, microbatches), jnp.arange(microbatches))
        sums = zero_sums(grad_fn, params, jax.tree.map(lambda x: x[0], xs[0]), key, scale)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), sums)
        (grads, loss_sum, count, sums), _ = jax.lax.scan(accumulate, init, xs)
        return grads, loss_sum, count, sums

    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(state.rng, state.step)
        scale = None if scaling is None else state.loss_scale.scale
        old_params = state.params
        if offload_params is not None:  # offloaded: a layer at a time to the devices
            model_params = streamed(old_params, offload_params, spec.logical)
            grads, loss_sum, count, sums = grads_and_loss(model_params, batch, key, scale)
            # The masters come whole to the devices for the update, once gradients exist.
            old_params, grads = jax.lax.optimization_barrier((old_params, grads))
            old_params = fetch(old_params, offload_params)
        else:
            grads, loss_sum, count, sums = grads_and_loss(old_params, batch, key, scale)
        divisor = count if scale is None else count * scale
        grads, seen = fp8_history.split(histories, grads)
        grads = jax.tree.map(lambda g, p: (g / divisor).astype(p.dtype), grads, old_params)
        # An offloaded optimizer state is read onto the devices for the update only.
        old_opt = state.opt_state if offload is None else fetch(state.opt_state, offload)
        updates, opt_state = tx.update(grads, old_opt, old_params)
        params = optax.apply_updates(old_params, updates)
        params = fp8_history.record(histories, params, old_params, seen)
        loss, grad_norm = loss_sum / count, optax.tree.norm(grads)
        finite_loss, finite_grads = jnp.isfinite(loss), jnp.isfinite(grad_norm)
        # Under loss scaling non-finite gradients are an overflow, routine and not a fault.
        fault = ~finite_loss if scaling is not None else ~(finite_loss & finite_grads)
        keep = finite_grads if scaling is not None else jnp.array(True)
        skipped = state.skipped
        if skip_nonfinite:
            keep = keep & ~fault
            skipped = skipped + jnp.where(fault, 1, 0).astype(skipped.dtype)
        if scaling is not None or skip_nonfinite:
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(keep, new, old),
                (params, opt_state),
                (old_params, old_opt),
            )
        metrics = {
            "loss": loss,
            # The rate this update applied: the schedule at the optimizer's own count,
            # which a skipped step (on_nonfinite=skip, an overflow) does not advance.
            "lr": lr_schedule(schedule_count(old_opt)),
            "grad_norm": grad_norm,
            "update_norm": optax.tree.norm(updates),
            "param_norm": optax.tree.norm(fp8_history.split(histories, params)[0]),
            "skipped_steps": skipped,
        } | router_metrics(sums, count)
        scaled = state.loss_scale
        if scaling is not None:
            scaled = loss_scale.advance(scaled, finite_grads, scaling)
            metrics |= {"loss_scale": scaled.scale, "overflow_steps": scaled.overflows}
        if offload is not None:
            opt_state = store(opt_state, offload)
        if offload_params is not None:
            params = store(params, offload_params)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            skipped=skipped,
            loss_scale=scaled,
        )
        return new_state, metrics

    return train_step


def make_eval_step(
    spec: ModelSpec, *, loss_chunk_tokens: int = 0, row_shards: int = 1, offload_params: Any = None
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """``eval_step(params, batch) -> {"loss_sum", "count"}``, no dropout; the logits
    formed a chunk at a time as in :func:`make_train_step`; parameters in host memory
    (``offload_params``, their shardings) are read onto the devices first."""

    def eval_step(params, batch):
        if offload_params is not None:
            params = streamed(params, offload_params, spec.logical)
        loss_sum, count, _ = _loss_sum(spec, params, batch, None, loss_chunk_tokens, row_shards)
        return {"loss_sum": loss_sum, "count": count}

    return eval_step

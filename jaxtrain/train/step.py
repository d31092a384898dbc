"""The pure training and evaluation steps.

``train_step(state, batch) -> (state, metrics)`` is the whole update: forward, backward,
gradient accumulation over microbatches (a ``lax.scan``, not a Python loop), clipping and
the AdamW update. It does no host work; the loop jits it once with explicit shardings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxtrain.train.optim import schedule_count
from jaxtrain.train.state import ModelSpec, TrainState

Batch = dict[str, jax.Array]


def cross_entropy_sum(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the number of counted tokens (float32).

    Args:
        logits: [B, L, V] float32.
        targets: [B, L] int token ids.
        weights: optional [B, L] 0/1 weights; default all ones.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weights = jnp.ones_like(losses) if weights is None else weights.astype(losses.dtype)
    return jnp.sum(losses * weights), jnp.sum(weights)


def model_inputs(batch: Batch) -> dict[str, jax.Array | None]:
    """The model's keyword inputs in a batch: the documents' positions and segment ids
    (None unless packed) and, for an encoder-decoder, the decoder's inputs."""
    kwargs = {"positions": batch.get("positions"), "segment_ids": batch.get("segment_ids")}
    if "decoder_inputs" in batch:
        kwargs["decoder_inputs"] = batch["decoder_inputs"]
    return kwargs


def _split_microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...], microbatch m taking rows m, m+n, m+2n, ...

    Interleaving keeps every device's shard of the batch dimension spread evenly over the
    microbatches, so accumulation needs no data movement.
    """

    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:])  # [B/n, n, ...]
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(
    spec: ModelSpec,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    microbatches: int = 1,
    skip_nonfinite: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build the pure step for a model, an optimizer and an accumulation count.

    With ``skip_nonfinite`` a step whose loss or gradient norm is NaN/Inf leaves the
    parameters and optimizer state as they were and counts itself in ``state.skipped``.
    """

    def loss_fn(params, batch, key):
        logits = spec.apply(params, batch["inputs"], dropout_key=key, **model_inputs(batch))
        loss_sum, count = cross_entropy_sum(logits, batch["targets"], batch.get("weights"))
        return loss_sum, count

    def grad_fn(params, batch, key):
        """(float32 grads of the summed loss, summed loss, token count)."""
        (loss_sum, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), loss_sum, count

    def grads_and_loss(params, batch, key):
        if microbatches == 1:
            return grad_fn(params, batch, key)

        def accumulate(carry, xs):
            grads, loss_sum, count = carry
            mb, index = xs
            g, l, c = grad_fn(params, mb, jax.random.fold_in(key, index))
            grads = jax.tree.map(jnp.add, grads, g)
            if spec.param_shardings is not None:
                grads = jax.lax.with_sharding_constraint(grads, spec.param_shardings)
            return (grads, loss_sum + l, count + c), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        xs = (_split_microbatches(batch, microbatches), jnp.arange(microbatches))
        (grads, loss_sum, count), _ = jax.lax.scan(accumulate, init, xs)
        return grads, loss_sum, count

    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(state.rng, state.step)
        grads, loss_sum, count = grads_and_loss(state.params, batch, key)
        grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss, grad_norm = loss_sum / count, optax.tree.norm(grads)
        skipped = state.skipped
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, opt_state),
                (state.params, state.opt_state),
            )
            skipped = skipped + jnp.where(finite, 0, 1).astype(skipped.dtype)
        metrics = {
            "loss": loss,
            # The rate this update applied: the schedule at the optimizer's own count,
            # which a skipped step (on_nonfinite=skip) does not advance.
            "lr": lr_schedule(schedule_count(state.opt_state)),
            "grad_norm": grad_norm,
            "update_norm": optax.tree.norm(updates),
            "param_norm": optax.tree.norm(params),
            "skipped_steps": skipped,
        }
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, skipped=skipped
        )
        return new_state, metrics

    return train_step


def make_eval_step(spec: ModelSpec) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """``eval_step(params, batch) -> {"loss_sum", "count"}``, no dropout."""

    def eval_step(params, batch):
        logits = spec.apply(params, batch["inputs"], **model_inputs(batch))
        loss_sum, count = cross_entropy_sum(logits, batch["targets"], batch.get("weights"))
        return {"loss_sum": loss_sum, "count": count}

    return eval_step

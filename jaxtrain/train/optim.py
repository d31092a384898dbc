"""AdamW (Loshchilov & Hutter, 2019) from config: warmup + cosine schedule, global-norm
clipping, and no weight decay on norm scales."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxtrain.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``cfg.lr``, then cosine decay to ``lr * min_lr_ratio``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def schedule_count(opt_state: Any) -> jax.Array:
    """The optimizer's own step count: the schedule's argument for its next update.

    It differs from ``state.step`` once a step was skipped (``train.on_nonfinite=skip``
    keeps the old optimizer state, count included), so the rate actually applied is
    ``schedule(schedule_count(opt_state))``, not ``schedule(state.step)``.
    """
    kind = optax.ScaleByScheduleState
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kind))
    found = [leaf.count for leaf in leaves if isinstance(leaf, kind)]
    if len(found) != 1:
        raise ValueError(f"expected one scheduled rate in the optimizer state, found {len(found)}")
    return found[0]


def decay_mask(logical: Any) -> Any:
    """True for parameters that get weight decay: all but norm scales, biases and float8
    amax histories (which the step overwrites)."""
    return jax.tree.map(
        lambda axes: not {"norm", "bias", "fp8_history"} & set(axes),
        logical,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def make_optimizer(
    cfg: OptimConfig, total_steps: int, logical: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation and its learning-rate schedule.

    Args:
        cfg: optimizer settings.
        total_steps: length of the run (sets the cosine decay horizon).
        logical: logical axes of the parameters (a tree like the parameters).
    """
    lr = schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(
        optax.adamw(
            lr,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(logical),
        )
    )
    return optax.chain(*parts), lr

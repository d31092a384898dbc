"""Dynamic loss scaling for float16 compute.

float16 keeps 5 exponent bits: gradients below ~6e-8 flush to zero and activations'
cotangents often sit there. The step multiplies the loss by a scale before the backward
pass, so the cotangents flowing through the float16 graph are that much larger, and
divides the float32 gradients by it afterwards. The scale adapts (Micikevicius et al.,
2018; BMTrain's ``OptimManager``, PyTorch's ``GradScaler``): a step whose gradients are
not finite is an overflow, so its update is dropped and the scale divided by
``factor``; after ``period`` finite steps in a row the scale is multiplied by ``factor``.

The scale and its counters are part of the train state, so a checkpoint carries them and
a resumed run continues with exactly the scale it had.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxtrain.config import LossScaleConfig


@struct.dataclass
class LossScale:
    """The scale the next step multiplies its loss by, the finite steps since it last
    changed, and the overflows (dropped updates) so far."""

    scale: jax.Array  # float32 scalar
    good_steps: jax.Array  # int32 scalar
    overflows: jax.Array  # int32 scalar


def initial(cfg: LossScaleConfig) -> LossScale:
    """The state a fresh run starts from: ``cfg.init``, no steps counted."""
    return LossScale(
        scale=jnp.asarray(cfg.init, jnp.float32),
        good_steps=jnp.zeros((), jnp.int32),
        overflows=jnp.zeros((), jnp.int32),
    )


def advance(state: LossScale, finite: jax.Array, cfg: LossScaleConfig) -> LossScale:
    """The state after a step whose gradients were ``finite`` (a boolean scalar): an
    overflow lowers the scale (not below ``cfg.min``) and restarts the count; the
    ``cfg.period``-th finite step in a row raises it (while it stays finite in float32)."""
    good = jnp.where(finite, state.good_steps + 1, 0)
    grow = good >= cfg.period
    raised = state.scale * cfg.factor
    raised = jnp.where(jnp.isfinite(raised), raised, state.scale)
    lowered = jnp.maximum(state.scale / cfg.factor, cfg.min)
    return LossScale(
        scale=jnp.where(finite, jnp.where(grow, raised, state.scale), lowered),
        good_steps=jnp.where(grow, 0, good).astype(jnp.int32),
        overflows=state.overflows + jnp.where(finite, 0, 1).astype(jnp.int32),
    )

"""The step's side of FP8 delayed scaling (:mod:`jaxtrain.models.fp8`): the amax
histories are parameters that are not trained.

Their "gradients" are the amaxes a microbatch saw, so microbatches combine them by
maximum, not by sum; they are taken out of the gradients before the division by the
token count, the norm and the optimizer; and the step writes each into its history
(newest first, the oldest dropped) instead of applying an update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxtrain.models.fp8 import HISTORY_AXES


def mask(logical: Any) -> Any | None:
    """True at the amax histories of a tree of logical axes, False elsewhere; None when
    there are none (``model.fp8`` off)."""
    found = jax.tree.map(
        lambda axes: tuple(axes[-2:]) == HISTORY_AXES,
        logical,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    return found if any(jax.tree.leaves(found)) else None


def combine(histories: Any | None, a: Any, b: Any) -> Any:
    """Microbatches' gradients added, and their amaxes (at ``histories``) maximised."""
    if histories is None:
        return jax.tree.map(jnp.add, a, b)
    return jax.tree.map(lambda h, x, y: jnp.maximum(x, y) if h else x + y, histories, a, b)


def split(histories: Any | None, grads: Any) -> tuple[Any, Any]:
    """(the gradients with zeros at the histories, the amaxes seen, zeros elsewhere)."""
    if histories is None:
        return grads, None
    zeros = jnp.zeros_like
    kept = jax.tree.map(lambda h, g: zeros(g) if h else g, histories, grads)
    seen = jax.tree.map(lambda h, g: g if h else zeros(g), histories, grads)
    return kept, seen


def record(histories: Any | None, params: Any, old: Any, seen: Any) -> Any:
    """``params`` with each history replaced by its ``old`` one shifted right by one step
    and the amaxes ``seen`` (column 0) written in front."""
    if histories is None:
        return params

    def one(h, new, past, amax):
        if not h:
            return new
        return jnp.concatenate([amax[..., :1], past[..., :-1]], axis=-1)

    return jax.tree.map(one, histories, params, old, seen)

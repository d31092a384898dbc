"""Where each stacked layer is stored, and moving a train state between stored orders.

A circular pipeline stores its stacked layers stage by stage
(:func:`jaxtrain.models.pipeline.layer_order`), every other layout in the model's own
order. The order is named by a layout ``(stages, repeats)``; a checkpoint records its
layout, a state restored under another layout has its stacked leaves (parameters and
their optimizer state, whose first logical axis is ``layers``) permuted to the new one,
and parameters leave a training program (exported, sampled from) in the model's order.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxtrain.models.pipeline import layer_order
from jaxtrain.sharding import opt_axes

Layout = tuple[int, int]  # (pipeline stages, repeats)
MODEL_ORDER: Layout = (1, 1)


def saved_layout(meta: dict) -> Layout:
    """The layout a checkpoint's record names (older checkpoints: the model's order)."""
    saved = meta.get("layer_order") or {}
    return int(saved.get("stages", 1)), int(saved.get("repeats", 1))


def record(layout: Layout) -> dict:
    """What a checkpoint's record says of ``layout`` (see :func:`saved_layout`)."""
    return {"layer_order": {"stages": layout[0], "repeats": layout[1]}}


def permutation(n: int, src: Layout, dst: Layout) -> np.ndarray | None:
    """Rows of a stack of ``n`` layers stored in ``src``'s order that give ``dst``'s order
    (``dst = src[p]``), or None when the orders agree."""
    p = np.argsort(layer_order(n, *src))[layer_order(n, *dst)]
    return None if (p == np.arange(n)).all() else p


def _permute(a: jax.Array, axes: Any, src: Layout, dst: Layout) -> jax.Array:
    if not axes or axes[0] != "layers":
        return a
    p = permutation(a.shape[0], src, dst)
    return a if p is None else a[p]


def reorder_params(params: Any, logical: Any, src: Layout, dst: Layout) -> Any:
    """``params`` (whose logical axes are ``logical``) from ``src``'s order to ``dst``'s."""
    return jax.tree.map(lambda a, axes: _permute(a, axes, src, dst), params, logical)


def reorder_opt_state(opt_state: Any, logical: Any, src: Layout, dst: Layout) -> Any:
    """An optax state of parameters with axes ``logical``, from ``src``'s order to ``dst``'s."""
    axes_of = opt_axes(logical)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: _permute(a, axes_of(path, a), src, dst), opt_state
    )

"""Rematerialisation policies by name (``model.remat``): what each scanned block keeps
for the backward pass, and what it recomputes.

Every matmul against a weight (:func:`~jaxtrain.models.dense.weight_einsum`) names its
output, so a policy can save some and recompute the rest (``jax.checkpoint_policies``;
the names follow MaxText's). Dimensions: B batch, L length, D width, F MLP width.

- ``none``: no remat; the backward pass reads everything the forward pass made.
- ``full``: save only each block's input; recompute the block (BMTrain's CheckpointBlock).
- ``dots_saveable``: save every weight matmul's output (and plain dots without batch
  dimensions); recompute norms, activations, attention.
- ``save_qkvo_proj``: save the attention projections (q, k, v [B, L, heads, H] and the
  output [B, L, D]); recompute the MLP and the rest.
- ``save_dots_except_mlp_in``: save every weight matmul but the MLP's widest, [B, L, F]
  (gate and up, or GPT-2's input), which are recomputed from the saved [B, L, D] input.
  The MLP's output only joins the residual sum, which the backward pass never needs, so
  JAX keeps no copy of it: for these models this saves what ``save_qkvo_proj`` does.
- ``offload_dots``: what ``dots_saveable`` saves, written to host memory (``pinned_host``)
  in the forward pass and read back in the backward pass: device memory holds one
  block's activations while the host holds the rest.
"""

from __future__ import annotations

import jax

QUERY_PROJ = "query_proj"
KEY_PROJ = "key_proj"
VALUE_PROJ = "value_proj"
OUT_PROJ = "out_proj"
MLP_IN = "mlp_in"  # [B, L, F]: gate and up (SwiGLU), or the input projection (GPT-2)
MLP_OUT = "mlp_out"  # [B, L, D]
WEIGHT_MATMUL = "weight_matmul"  # any other matmul against a weight

MATMULS = (QUERY_PROJ, KEY_PROJ, VALUE_PROJ, OUT_PROJ, MLP_IN, MLP_OUT, WEIGHT_MATMUL)
ATTENTION_PROJ = (QUERY_PROJ, KEY_PROJ, VALUE_PROJ, OUT_PROJ)

_p = jax.checkpoint_policies

POLICIES = {
    "full": _p.nothing_saveable,
    # weight_einsum's custom VJP hides its dot from dots_with_no_batch_dims_saveable, so
    # its outputs are saved by name.
    "dots_saveable": _p.save_from_both_policies(
        _p.dots_with_no_batch_dims_saveable, _p.save_only_these_names(*MATMULS)
    ),
    "save_qkvo_proj": _p.save_only_these_names(*ATTENTION_PROJ),
    "save_dots_except_mlp_in": _p.save_only_these_names(*(n for n in MATMULS if n != MLP_IN)),
    "offload_dots": _p.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=list(MATMULS),
        offload_src="device",
        offload_dst="pinned_host",
    ),
}
NAMES = ("none", *POLICIES)  # = config.REMAT_POLICIES

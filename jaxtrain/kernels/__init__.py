"""Compute kernels behind a switch, each with a plain-JAX reference twin."""

from jaxtrain.kernels.attention import IMPLS, attention, chunked_causal_attention, xla_attention

__all__ = ["IMPLS", "attention", "chunked_causal_attention", "xla_attention"]

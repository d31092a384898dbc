"""Compute kernels behind a switch, each with a plain-JAX reference twin."""

from jaxtrain.kernels.attention import (
    IMPLS,
    KERNEL_IMPLS,
    attention,
    chunked_causal_attention,
    cudnn_attention,
    resolve_call,
    resolve_impl,
    xla_attention,
)
from jaxtrain.kernels.flash import BlockSizes, flash_attention

__all__ = [
    "IMPLS",
    "KERNEL_IMPLS",
    "BlockSizes",
    "attention",
    "chunked_causal_attention",
    "cudnn_attention",
    "flash_attention",
    "resolve_call",
    "resolve_impl",
    "xla_attention",
]

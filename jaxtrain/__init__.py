"""jaxtrain: train large Transformer models with JAX/XLA SPMD.

One jit-compiled step, any mesh: models carry logical axis names and one rules table
maps them onto the ``data``, ``fsdp``, ``sequence`` and ``tensor`` axes of a device mesh.
"""

__version__ = "0.1.0"

"""The loader that turns a token dataset into sharded global batches.

Batches are random windows of ``seq_len + 1`` tokens, the packed-sequence sampling of
nanoGPT and of GPT-2 (Radford et al., 2019). The windows of a batch are a pure function
of ``(seed, stream, step)``, so a resumed run reads the same data as one that never
stopped, and every process agrees on the global batch while building only the rows its
devices hold (``jax.make_array_from_process_local_data``), which is how one program
feeds one CPU or a multi-host pod.

With packing (``data.packing``) a window's documents are kept apart, as InternEvo and
Krell et al. (2021) pack sequences: each row also carries per-token ``segment_ids``
(attention stays within a document), ``positions`` (RoPE restarts at 0 at each document)
and ``weights`` (0 for the target that crosses from one document into the next).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from jaxtrain.data.dataset import TokenDataset
from jaxtrain.errors import UserError

if TYPE_CHECKING:
    from jaxtrain.data.objectives import Objective

TRAIN_STREAM = 0
EVAL_STREAM = 1


def batch_dtypes(packing: bool) -> dict[str, type]:
    """The arrays of a batch, each [B, L], and their dtypes: ``inputs`` and ``targets``,
    and with ``packing`` the documents' ``segment_ids``, ``positions`` and ``weights``."""
    dtypes = {"inputs": np.int32, "targets": np.int32}
    if packing:
        dtypes |= {"segment_ids": np.int32, "positions": np.int32, "weights": np.float32}
    return dtypes


def sample_windows(
    tokens: np.ndarray,
    *,
    seed: int,
    step: int,
    stream: int,
    batch: int,
    seq_len: int,
    rows: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Cuts ``batch`` random windows out of ``tokens``, deterministically.

    Args:
      tokens: a 1-D token array.
      seed: the run's data seed.
      step: the training step or eval batch index.
      stream: separates independent streams of batches (train 0, eval 1).
      batch: rows in the global batch.
      seq_len: tokens per row.
      rows: the rows to return, in this order; defaults to all. Row ``r`` is the same
        whatever ``rows`` is, so processes can each build their own rows of one global
        batch.

    Returns:
      ``{"inputs": int32[len(rows), seq_len], "targets": int32[len(rows), seq_len]}``,
      where ``targets`` is ``inputs`` shifted left by one token.

    Raises:
      UserError: ``tokens`` is shorter than one window of ``seq_len + 1``.
    """
    if len(tokens) < seq_len + 1:
        raise UserError(
            f"data.seq_len: {seq_len} needs windows of {seq_len + 1} tokens but the split "
            f"has only {len(tokens)}"
        )
    rng = np.random.default_rng([seed, stream, step])
    # Draw every row's offset before selecting rows, so row r never depends on `rows`.
    offsets = rng.integers(0, len(tokens) - seq_len, size=batch)
    if rows is not None:
        offsets = offsets[np.asarray(rows, dtype=np.int64)]
    windows = np.asarray(tokens[offsets[:, None] + np.arange(seq_len + 1)], dtype=np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def document_boundaries(inputs: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """Where the documents of packed rows start and end, as the model and loss need it.

    A document ends with its EOS, so the token after an EOS opens the next document.

    Args:
      inputs: int [B, L] input tokens (the targets are these shifted left by one).
      eos_id: the document separator id.

    Returns:
      ``segment_ids`` int32 [B, L] (0, 1, 2, ... along each row), ``positions`` int32
      [B, L] (0 at each document's first token) and ``weights`` float32 [B, L] (0 where
      the input is EOS: its target is the first token of another document).
    """
    eos = inputs == eos_id
    starts = np.zeros_like(eos)
    starts[:, 1:] = eos[:, :-1]
    index = np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape)
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {
        "segment_ids": np.cumsum(starts, axis=1, dtype=np.int32),
        "positions": (index - first).astype(np.int32),
        "weights": (~eos).astype(np.float32),
    }


def process_rows(
    sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]
) -> range | tuple[int, ...]:
    """The batch rows (dimension 0) held by this process's devices, in increasing order.

    Usually one contiguous run. A hybrid mesh that splits ``fsdp`` across hosts while
    ``data`` stays within them (``mesh.dcn_fsdp`` > 1 with ``mesh.data`` > 1) gives each
    process several separate runs: the batch is split over ``("data", "fsdp")``, data
    outermost, so the host (a part of the fsdp index) is not the outermost part of the
    row index, and no device order can change that. The rows are listed in the order
    ``jax.make_array_from_process_local_data`` reads a process's data: the k-th block of
    local rows goes to the devices of the k-th lowest shard.

    Args:
      sharding: the batch's sharding.
      global_shape: the global batch shape.

    Returns:
      A range when the rows are contiguous, else a tuple of row indices.
    """
    n = global_shape[0]
    held: set[int] = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        held.update(range(*index[0].indices(n)) if index else range(n))
    rows = sorted(held)
    if rows == list(range(rows[0], rows[-1] + 1)):
        return range(rows[0], rows[-1] + 1)
    return tuple(rows)


class Loader:
    """Global train and eval batches, sharded over the mesh's data axes."""

    def __init__(
        self,
        dataset: TokenDataset,
        *,
        seed: int,
        global_batch: int,
        seq_len: int,
        sharding: jax.sharding.NamedSharding,
        packing: bool = False,
        objective: Objective | None = None,
    ):
        """Prepares to build batches.

        Args:
          dataset: the tokens.
          seed: the data seed; with the step it fixes every batch.
          global_batch: rows per batch across all processes.
          seq_len: tokens per row.
          sharding: the sharding of a ``(global_batch, seq_len)`` batch.
          packing: add the documents' boundaries (:func:`document_boundaries`).
          objective: turns each window into the objective's inputs and targets
            (:mod:`jaxtrain.data.objectives`); None: the next token.
        """
        self.dataset = dataset
        self.seed = seed
        self.packing = packing
        self.seq_len = seq_len
        self.sharding = sharding
        self.global_shape = (global_batch, seq_len)
        self.rows = process_rows(sharding, self.global_shape)
        self.objective = objective
        self.window = seq_len if objective is None else objective.window(seq_len)
        # Checked here, at start-up, so a short validation split does not surface at the
        # first evaluation, after training.
        for split in ("train", "validation"):
            n = len(getattr(dataset, split))
            if n < self.window + 1:
                raise UserError(
                    f"data.path: {dataset.describe(split)} has {n} tokens, fewer than the "
                    f"{self.window + 1} of one window (data.seq_len={seq_len}); add "
                    "documents or lower data.seq_len"
                )

    def _batch(self, tokens: np.ndarray, stream: int, step: int) -> dict[str, jax.Array]:
        local = sample_windows(
            tokens,
            seed=self.seed,
            step=step,
            stream=stream,
            batch=self.global_shape[0],
            seq_len=self.window,
            rows=self.rows,
        )
        if self.packing:
            local |= document_boundaries(local["inputs"], self.dataset.eos_id)
        if self.objective is not None:
            local = self.objective(
                local,
                seed=self.seed,
                stream=stream,
                step=step,
                rows=self.rows,
                vocab_size=self.dataset.vocab_size,
                eos_id=self.dataset.eos_id,
            )
        return {
            k: jax.make_array_from_process_local_data(
                self.sharding, v, (self.global_shape[0], v.shape[1])
            )
            for k, v in local.items()
        }

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        """The training batch of ``step``: ``{"inputs", "targets"}``, int32[B, L], and the
        documents' boundaries when packing (see :func:`batch_dtypes`)."""
        return self._batch(self.dataset.train, TRAIN_STREAM, step)

    def eval_batch(self, index: int) -> dict[str, jax.Array]:
        """Validation batch number ``index``, laid out as :meth:`train_batch`."""
        return self._batch(self.dataset.validation, EVAL_STREAM, index)

"""Training objectives: how a window of tokens becomes a model's inputs and targets.

- ``causal_lm``: the next token (the loader's windows, unchanged).
- ``mlm``: BERT's masked-token prediction (Devlin et al., 2019): 15% of the tokens are
  selected, of which 80% become ``[MASK]``, 10% a random token and 10% stay; the loss
  counts only the selected positions (``weights``).
- ``span_corruption``: T5's objective (Raffel et al., 2020, section 3.1.4): 15% of the
  tokens, in spans of mean length 3, are each replaced in the encoder's input by one
  sentinel (``sentinel_id``, ``sentinel_id - 1``, ...); the decoder produces each
  sentinel followed by the span it stands for, then EOS. Its window is longer than
  ``data.seq_len`` so that the encoder input is exactly ``seq_len`` tokens, as T5's
  ``random_spans_helper`` computes (e.g. 568 raw tokens for 512, 114 targets).

Each transform is a pure function of one row's tokens and a numpy generator. The
generator of row ``r`` is seeded from ``(seed, stream, step, r)``: a batch depends only
on the run's seed and the step, and a process that builds some of the rows builds them
exactly as one process building all of them would.

Dimensions: B batch rows, L ``data.seq_len``, M decoder length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jaxtrain.config import Config
from jaxtrain.data.loader import batch_dtypes
from jaxtrain.errors import UserError

MASK_RATE = 0.15  # BERT: share of tokens selected for prediction
MASK_SPLIT = (0.8, 0.1)  # of those: replaced by the mask, by a random token (rest kept)
NOISE_DENSITY = 0.15  # T5: share of tokens corrupted
MEAN_SPAN = 3.0  # T5: mean length of a corrupted span


def row_rng(seed: int, stream: int, step: int, row: int) -> np.random.Generator:
    """The generator of one batch row. (``row + 1``: numpy's seeding ignores trailing
    zeros, and row 0 must not share the loader's window-sampling seed.)"""
    return np.random.default_rng([seed, stream, step, row + 1])


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    mask_id: int,
    eos_id: int,
) -> dict[str, np.ndarray]:
    """BERT's masking of one row.

    ``round(0.15 * n)`` (at least one) of the row's n non-EOS tokens are selected without
    replacement; each is replaced by ``mask_id`` with probability 0.8, by a token drawn
    uniformly from ``[0, vocab_size)`` with 0.1, and left as it is otherwise.

    Args:
        tokens: int [L] token ids.
        rng: this row's generator.
        vocab_size: the data's vocabulary (where random replacements come from).
        mask_id: the mask token.
        eos_id: the document separator; never selected.

    Returns:
        ``inputs`` int32 [L] (masked), ``targets`` int32 [L] (the original tokens) and
        ``weights`` float32 [L] (1 at the selected positions).
    """
    candidates = np.flatnonzero(tokens != eos_id)
    count = min(len(candidates), max(1, round(MASK_RATE * len(candidates))))
    chosen = rng.choice(candidates, size=count, replace=False)
    draw = rng.random(count)
    inputs = np.array(tokens, dtype=np.int32)
    inputs[chosen[draw < MASK_SPLIT[0]]] = mask_id
    swap = chosen[(draw >= MASK_SPLIT[0]) & (draw < sum(MASK_SPLIT))]
    inputs[swap] = rng.integers(0, vocab_size, size=len(swap))
    weights = np.zeros(len(tokens), np.float32)
    weights[chosen] = 1.0
    return {"inputs": inputs, "targets": np.asarray(tokens, np.int32), "weights": weights}


def _noise(length: int) -> tuple[int, int]:
    """(corrupted tokens, spans) of a ``length``-token window, as T5 rounds them."""
    noise = min(max(round(length * NOISE_DENSITY), 1), length - 1)
    return noise, max(round(noise / MEAN_SPAN), 1)


def span_lengths(seq_len: int) -> tuple[int, int]:
    """(raw window length, decoder length M) for encoder inputs of exactly ``seq_len``.

    The encoder sees the raw tokens less the corrupted ones, plus a sentinel per span and
    EOS; the decoder a sentinel per span, the corrupted tokens and EOS.

    Raises:
        UserError: if no window gives exactly ``seq_len`` encoder tokens (too short).
    """

    def encoder_len(raw: int) -> int:
        noise, spans = _noise(raw)
        return raw - noise + spans + 1

    raw = next((r for r in range(2 * seq_len + 2, 1, -1) if encoder_len(r) <= seq_len), 0)
    if raw == 0 or encoder_len(raw) != seq_len:
        raise UserError(f"data.seq_len: {seq_len} is too short for span corruption")
    noise, spans = _noise(raw)
    return raw, noise + spans + 1


def _segments(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` items cut at random into ``parts`` non-empty runs: their lengths."""
    cuts = np.sort(rng.choice(total - 1, size=parts - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [total]]))


def corrupt_spans(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    eos_id: int,
    sentinel_id: int,
    decoder_start_id: int,
) -> dict[str, np.ndarray]:
    """T5's span corruption of one raw window (its length from :func:`span_lengths`).

    The window alternates kept and corrupted spans, kept first, their lengths drawn as
    T5's ``random_spans_noise_mask`` does. Span k becomes sentinel ``sentinel_id - k``.

    Args:
        tokens: int [raw] token ids.
        rng: this row's generator.
        eos_id: appended to the encoder input and the targets.
        sentinel_id: the first sentinel; later ones count down from it.
        decoder_start_id: the decoder's first input.

    Returns:
        ``inputs`` int32 [L] (kept tokens and sentinels, EOS), ``targets`` int32 [M]
        (each sentinel and its span, EOS) and ``decoder_inputs`` int32 [M] (the targets
        shifted right behind ``decoder_start_id``).
    """
    tokens = np.asarray(tokens, np.int32)
    noise, spans = _noise(len(tokens))
    kept_lengths = _segments(len(tokens) - noise, spans, rng)
    noise_lengths = _segments(noise, spans, rng)
    lengths = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
    corrupted = np.repeat(np.tile([False, True], spans), lengths)  # [raw]
    first = corrupted & ~np.concatenate([[False], corrupted[:-1]])  # each span's first token
    sentinels = (sentinel_id - np.arange(spans)).astype(np.int32)
    inputs = np.where(first, sentinel_id - (np.cumsum(first) - 1), tokens)[~corrupted | first]
    starts = np.concatenate([[0], np.cumsum(noise_lengths)[:-1]])
    targets = np.insert(tokens[corrupted], starts, sentinels)
    eos = np.array([eos_id], np.int32)
    inputs, targets = np.concatenate([inputs, eos]), np.concatenate([targets, eos])
    decoder_inputs = np.concatenate([[decoder_start_id], targets[:-1]]).astype(np.int32)
    return {"inputs": inputs.astype(np.int32), "targets": targets, "decoder_inputs": decoder_inputs}


@dataclasses.dataclass(frozen=True)
class Objective:
    """A config's objective with the token ids it needs; the loader's batch transform.

    Attributes:
        name: ``causal_lm``, ``mlm`` or ``span_corruption`` (``train.objective``).
        mask_id: ``model.mask_id``.
        sentinel_id: ``model.sentinel_id``.
        decoder_start_id: ``model.decoder_start_id``.
    """

    name: str = "causal_lm"
    mask_id: int = 0
    sentinel_id: int = 0
    decoder_start_id: int = 0

    @classmethod
    def from_config(cls, cfg: Config) -> Objective:
        m = cfg.model
        return cls(cfg.train.objective, m.mask_id, m.sentinel_id, m.decoder_start_id)

    def window(self, seq_len: int) -> int:
        """Tokens the loader cuts per row (its ``seq_len``; span corruption needs more)."""
        return span_lengths(seq_len)[0] if self.name == "span_corruption" else seq_len

    def layout(self, seq_len: int, packing: bool) -> dict[str, tuple[int, type]]:
        """Each array of a batch: its length and dtype (every array is [B, length])."""
        if self.name == "span_corruption":
            decoder = span_lengths(seq_len)[1]
            return {
                "inputs": (seq_len, np.int32),
                "decoder_inputs": (decoder, np.int32),
                "targets": (decoder, np.int32),
            }
        dtypes = batch_dtypes(packing)
        if self.name == "mlm":
            dtypes |= {"weights": np.float32}
        return {key: (seq_len, dtype) for key, dtype in dtypes.items()}

    def check(self, eos_id: int, seq_len: int) -> None:
        """Refuse special ids that collide with the data's EOS or run below 0.

        Raises:
            UserError: naming the ``model.*`` key.
        """
        if self.name == "mlm" and self.mask_id == eos_id:
            raise UserError(f"model.mask_id: {self.mask_id} is the tokenizer's EOS id")
        if self.name == "span_corruption":
            raw, _ = span_lengths(seq_len)
            lowest = self.sentinel_id - _noise(raw)[1] + 1
            if lowest < 0 or lowest <= eos_id <= self.sentinel_id:
                raise UserError(
                    f"model.sentinel_id: sentinels {self.sentinel_id} down to {lowest} "
                    f"must be token ids that are not EOS ({eos_id})"
                )

    def __call__(
        self,
        local: dict[str, np.ndarray],
        *,
        seed: int,
        stream: int,
        step: int,
        rows: Sequence[int],
        vocab_size: int,
        eos_id: int,
    ) -> dict[str, np.ndarray]:
        """The batch rows ``rows`` of step ``step`` from the loader's windows.

        Args:
            local: the loader's rows: ``inputs`` [R, window] (and their ``targets``,
                and with packing the documents' boundaries).
            seed, stream, step: what the batch is a function of.
            rows: the global row index of each local row.
            vocab_size: the data's vocabulary.
            eos_id: the data's document separator.

        Returns:
            ``local`` with the objective's ``inputs``/``targets``/... in place.
        """
        transform: Callable[..., dict[str, np.ndarray]]
        windows = local["inputs"]
        if self.name == "mlm":
            transform, kwargs = mask_tokens, {"vocab_size": vocab_size, "mask_id": self.mask_id}
        elif self.name == "span_corruption":
            transform = corrupt_spans
            kwargs = {"sentinel_id": self.sentinel_id, "decoder_start_id": self.decoder_start_id}
            local = {}  # the windows' shifted targets do not apply
        else:
            return local
        made = [
            transform(tokens, row_rng(seed, stream, step, row), eos_id=eos_id, **kwargs)
            for tokens, row in zip(windows, rows, strict=True)
        ]
        # MLM keeps the packing boundaries (segment_ids, positions) and replaces weights.
        return local | {key: np.stack([m[key] for m in made]) for key in made[0]}

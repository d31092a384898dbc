"""Token datasets: two 1-D token arrays (train, validation) with EOS between documents,
memory-mapped from ``prepare`` output or built in memory from the built-in corpus.

Opening one checks everything a run relies on before it compiles anything: the
``meta.json`` fields and their types, that each split is a plain ``.npy`` array (never
unpickled), that the run's tokenizer and EOS are the ones the data was prepared with,
and (:func:`check_dataset`) that every id fits the model's vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from jaxtrain.data.tokenizer import Tokenizer
from jaxtrain.errors import UserError, quote


@dataclasses.dataclass(frozen=True)
class TokenDataset:
    """Train and validation tokens, each a 1-D array with EOS after every document.

    Attributes:
      train: training tokens (may be a read-only ``np.memmap``).
      validation: validation tokens (may be a read-only ``np.memmap``).
      vocab_size: size of the vocabulary the ids come from.
      eos_id: the document separator id.
      source: where the tokens came from, for humans.
      path: the ``prepare`` output directory; ``""`` for tokens built in memory.
      max_id: the largest id in either split, when ``meta.json`` records it; None: not
        known without reading the tokens.
    """

    train: np.ndarray
    validation: np.ndarray
    vocab_size: int
    eos_id: int
    source: str
    path: str = ""
    max_id: int | None = None

    def describe(self, split: str) -> str:
        """Names a split for error messages: its file, or the in-memory source."""
        return f"{Path(self.path) / split}.npy" if self.path else f"{self.source} ({split})"


def _file_sha256(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


# The meta.json fields open_dataset reads: (type, required). bool is refused where an int
# is expected although Python counts it as one: `"vocab_size": true` is a broken file.
META_FIELDS = {
    "format": (int, True),
    "vocab_size": (int, True),
    "eos_id": (int, True),
    "tokenizer": (str, True),
    "tokenizer_sha256": (str, False),
    "max_id": (int, False),
}


def _read_meta(file: Path) -> dict:
    """Reads a prepare output's meta.json and checks the type and range of its fields."""
    try:
        meta = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as e:
        raise UserError(f"data.path: cannot read {file} ({e.strerror})") from None
    except ValueError as e:  # also UnicodeDecodeError
        raise UserError(f"data.path: {file} is not a jaxtrain meta.json ({quote(e)})") from None
    if not isinstance(meta, dict):
        raise UserError(f"data.path: {file} is not a jaxtrain meta.json (not a JSON object)")
    for name, (kind, required) in META_FIELDS.items():
        value = meta.get(name)
        if value is None and not required:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            what = "an integer" if kind is int else "a string"
            shown = quote(repr(value)[:100])  # repr: a string shows its quotes
            got = "missing" if name not in meta else f"{type(value).__name__} {shown}"
            raise UserError(f"data.path: {file}: field {name!r} must be {what}, not {got}")
    checks = [
        (meta["format"] == 1, "format", "this jaxtrain reads format 1"),
        (meta["vocab_size"] > 0, "vocab_size", "must be positive"),
        (0 <= meta["eos_id"] < meta["vocab_size"], "eos_id", "must be in [0, vocab_size)"),
        (meta.get("max_id") is None or meta["max_id"] >= 0, "max_id", "must be >= 0"),
    ]
    for ok, name, rule in checks:
        if not ok:
            raise UserError(f"data.path: {file}: field {name!r} is {meta[name]}; {rule}")
    return meta


def _open_split(file: Path) -> np.ndarray:
    """Memory-maps one split read-only; anything but a plain 1-D .npy array is refused."""
    try:
        with file.open("rb") as f:
            magic = f.read(len(np.lib.format.MAGIC_PREFIX))
    except OSError as e:
        raise UserError(f"data.path: cannot read {file} ({e.strerror})") from None
    # np.load takes a file without the .npy magic for a pickle; say what it is instead.
    if magic != np.lib.format.MAGIC_PREFIX:
        raise UserError(f"data.path: {file} is not a .npy token array")
    try:
        tokens = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"data.path: cannot read {file} ({quote(e, 100)})") from None
    if tokens.ndim != 1:
        raise UserError(f"data.path: {file} is not a 1-D token array")
    return tokens


def _check_tokenizer(meta: dict, tokenizer: Tokenizer, path: Path) -> None:
    """Refuses a dataset that was tokenized with a different tokenizer or EOS."""
    same = meta["vocab_size"] == tokenizer.vocab_size
    if same and meta["tokenizer"] != tokenizer.name:
        # The same tokenizer.json may live at another path (a copied dataset, another
        # host); its content hash decides.
        digest = meta.get("tokenizer_sha256")
        same = (
            digest is not None
            and tokenizer.name != "byte"
            and digest == _file_sha256(tokenizer.name)
        )
    if not same:
        raise UserError(
            f"data.tokenizer: {tokenizer.name} (vocab {tokenizer.vocab_size}) is not the "
            f"tokenizer data.path {path} was prepared with ({meta['tokenizer']}, "
            f"vocab {meta['vocab_size']})"
        )
    if meta["eos_id"] != tokenizer.eos_id:
        raise UserError(
            f"data.eos_id: data.path {path} was prepared with EOS id {meta['eos_id']} but "
            f"the run's is {tokenizer.eos_id}; set data.eos_id={meta['eos_id']}"
        )


def open_dataset(path: str, tokenizer: Tokenizer) -> TokenDataset:
    """Opens the dataset named by the ``data.path`` config value.

    Args:
      path: ``""`` for the built-in corpus, else a directory written by ``prepare``.
      tokenizer: the run's tokenizer; it must be the one the data was prepared with.

    Returns:
      The dataset; prepared splits are memory-mapped read-only, never unpickled.

    Raises:
      UserError: the directory, its meta.json or a split is missing, unreadable or
        malformed, or the data was prepared with another tokenizer or EOS id.
    """
    if path == "":
        # Imported here: corpus.py imports TokenDataset from this module.
        from jaxtrain.data.corpus import builtin_corpus

        return builtin_corpus(tokenizer)

    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"data.path: {root} does not exist or is not a directory")
    meta_file = root / "meta.json"
    if not meta_file.is_file():
        raise UserError(
            f"data.path: {meta_file} does not exist; create the dataset with `jaxtrain prepare`"
        )
    meta = _read_meta(meta_file)
    _check_tokenizer(meta, tokenizer, root)
    splits = {split: _open_split(root / f"{split}.npy") for split in ("train", "validation")}
    return TokenDataset(
        train=splits["train"],
        validation=splits["validation"],
        vocab_size=meta["vocab_size"],
        eos_id=meta["eos_id"],
        source=f"{root.absolute()} (tokenizer {meta['tokenizer']})",
        path=str(root.absolute()),
        max_id=meta.get("max_id"),
    )


def check_dataset(dataset: TokenDataset, vocab_size: int) -> None:
    """Refuses tokens the model cannot embed, once at start-up rather than as a NaN loss.

    The largest id comes from ``meta.json`` when ``prepare`` recorded it; otherwise the
    splits are read once (a memory-mapped max, no copy).

    Args:
      dataset: the opened dataset.
      vocab_size: the model's vocabulary (``model.vocab_size``).

    Raises:
      UserError: a split is not an integer array, or holds an id outside
        ``[0, vocab_size)``.
    """
    splits = {"train": dataset.train, "validation": dataset.validation}
    for split, tokens in splits.items():
        if not np.issubdtype(tokens.dtype, np.integer):
            raise UserError(
                f"data.path: {dataset.describe(split)} holds {tokens.dtype} values, not "
                "integer token ids; create the dataset with `jaxtrain prepare`"
            )
    if dataset.max_id is not None:
        if dataset.max_id >= vocab_size:
            raise UserError(
                f"data.path: {dataset.path}/meta.json records token id {dataset.max_id} but "
                f"model.vocab_size is {vocab_size}"
            )
        return
    for split, tokens in splits.items():
        if len(tokens) == 0:
            continue  # the loader refuses a split too short for one window
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise UserError(
                f"data.path: {dataset.describe(split)} holds token id {bad} outside "
                f"model.vocab_size {vocab_size} (ids must be in [0, {vocab_size}))"
            )

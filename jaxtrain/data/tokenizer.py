"""Tokenizers: text <-> int32 token ids, with one EOS id that separates documents.

Two implementations behind one small protocol:

- ``ByteTokenizer``: ids 0..255 are the UTF-8 bytes of the text and id 256 is EOS, as in
  the byte-level models of ByT5 (Xue et al., 2022, arXiv:2105.13626). It needs no file,
  so the default model trains with nothing downloaded.
- ``HFTokenizer``: any Hugging Face ``tokenizer.json`` (BPE, WordPiece, Unigram) loaded
  with the Rust ``tokenizers`` library.

``load_tokenizer`` maps the ``data.tokenizer`` config value onto one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from jaxtrain.errors import UserError

# Special tokens that mark the end of a document, in the order they are tried
# (Llama 2 / T5, GPT-2, Llama 3, Gemma).
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and generation need from a tokenizer."""

    name: str  # "byte" or the absolute path of a tokenizer.json file
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray:
        """Returns the int32 ids of ``text``, without EOS."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes many texts at once (the HF tokenizer encodes them in parallel)."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Returns the text of ``ids``; ids that are not text (EOS) are dropped."""
        ...


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that stores every id of a vocabulary.

    Args:
      vocab_size: number of ids.

    Returns:
      ``uint16`` when every id fits in 16 bits, else ``uint32``.
    """
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and EOS as id 256."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of ``text`` as int32 ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes each text; bytes need no batching."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes the byte ids; EOS is dropped and broken UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` file, loaded with the ``tokenizers`` library."""

    def __init__(self, path: str | Path):
        """Loads the tokenizer.

        Args:
          path: a ``tokenizer.json`` file, or a directory that contains one.

        Raises:
          UserError: the file is missing or is not a tokenizer.json file.
        """
        from tokenizers import Tokenizer as RustTokenizer

        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "tokenizer.json"
        file = file.absolute()
        if not file.is_file():
            raise UserError(f"data.tokenizer: {file} does not exist")
        try:
            self._tok = RustTokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises plain Exception on bad files
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(
                f"data.tokenizer: {file} is not a tokenizer.json file ({first_line})"
            ) from None
        self.name = str(file)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos()

    def _find_eos(self) -> int:
        for token in EOS_CANDIDATES:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return self.vocab_size - 1

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of ``text``; the tokenizer's own BOS/EOS are not added."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes the texts in parallel on the Rust side."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes ``ids``, skipping special tokens such as EOS."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        return self._tok.decode(ids.tolist(), skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
    """Builds the tokenizer named by the ``data.tokenizer`` config value.

    Args:
      spec: ``"byte"``, or the path of a ``tokenizer.json`` file or of a directory that
        holds one.

    Returns:
      The tokenizer.

    Raises:
      UserError: the path does not exist or is not a tokenizer.json file.
    """
    if spec == "byte":
        return ByteTokenizer()
    if not spec:
        raise UserError('data.tokenizer: empty; use "byte" or a path to a tokenizer.json file')
    return HFTokenizer(spec)

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
# (Llama 2 / T5, GPT-2, Llama 3, Gemma, and BERT's separator). A tokenizer with none of
# them needs an explicit ``data.eos_id``: guessing an id would silently train on a wrong
# document separator.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")


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

    def __init__(self, path: str | Path, eos_id: int = -1):
        """Loads the tokenizer.

        Args:
          path: a ``tokenizer.json`` file, or a directory that contains one.
          eos_id: the document separator; -1 finds it among ``EOS_CANDIDATES``.

        Raises:
          UserError: the file is missing, unreadable or not a tokenizer.json file; the
            EOS id is out of range or cannot be found.
        """
        from tokenizers import Tokenizer as RustTokenizer

        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "tokenizer.json"
        file = file.absolute()
        if not file.is_file():
            raise UserError(f"data.tokenizer: {file} does not exist")
        try:
            text = file.read_bytes().decode("utf-8")
        except OSError as e:
            raise UserError(f"data.tokenizer: cannot read {file} ({e.strerror})") from None
        except UnicodeDecodeError:
            raise UserError(f"data.tokenizer: {file} is not UTF-8 text") from None
        try:
            self._tok = RustTokenizer.from_str(text)
        except Exception as e:  # the Rust library raises plain Exception on bad files
            first_line = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UserError(
                f"data.tokenizer: {file} is not a tokenizer.json file ({first_line})"
            ) from None
        self.name = str(file)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos() if eos_id == -1 else eos_id
        if not 0 <= self.eos_id < self.vocab_size:
            raise UserError(
                f"data.eos_id: {eos_id} is not an id of data.tokenizer {file} "
                f"(vocabulary {self.vocab_size})"
            )

    def _find_eos(self) -> int:
        for token in EOS_CANDIDATES:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        raise UserError(
            f"data.tokenizer: {self.name} has none of the end-of-document tokens "
            f"{', '.join(EOS_CANDIDATES)}; set data.eos_id (prepare: --eos-id) to its id"
        )

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


def load_tokenizer(spec: str, eos_id: int = -1) -> Tokenizer:
    """Builds the tokenizer named by the ``data.tokenizer`` config value.

    Args:
      spec: ``"byte"``, or the path of a ``tokenizer.json`` file or of a directory that
        holds one.
      eos_id: the ``data.eos_id`` config value: -1 uses the tokenizer's own end-of-document
        token (found by name for a tokenizer.json), another value that id.

    Returns:
      The tokenizer.

    Raises:
      UserError: the path does not exist or is not a readable tokenizer.json file, or no
        valid EOS id is known.
    """
    if spec == "byte":
        if eos_id not in (-1, ByteTokenizer.eos_id):
            raise UserError(
                f"data.eos_id: {eos_id}; the byte tokenizer's EOS is "
                f"{ByteTokenizer.eos_id} (leave data.eos_id at -1)"
            )
        return ByteTokenizer()
    if not spec:
        raise UserError('data.tokenizer: empty; use "byte" or a path to a tokenizer.json file')
    return HFTokenizer(spec, eos_id=eos_id)

"""``jaxtrain prepare``: text, JSONL and Parquet files -> packed token files.

The output directory holds what ``loader.open_dataset`` memory-maps:

- ``train.npy`` and ``validation.npy``: 1-D ``uint16`` (or ``uint32`` for vocabularies
  over 65535 ids) token arrays, every document followed by EOS, the packed-sequence
  layout of GPT-2 (Radford et al., 2019) and nanoGPT. Plain ``.npy`` (NEP 1), so they
  open with ``np.load(mmap_mode="r", allow_pickle=False)`` and nothing is unpickled.
- ``meta.json``: the tokenizer, vocabulary size, EOS id, dtype, per-split token and
  document counts and the source files. It is written last, so a crash never leaves a
  ``meta.json`` that points at half-written token files.

Memory stays bounded: documents are read and tokenized in batches and streamed to disk;
only the ``.npy`` header is rewritten at the end, once the token count is known.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxtrain.data.tokenizer import Tokenizer, load_tokenizer, token_dtype
from jaxtrain.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".parquet")
SPLITS = ("train", "validation")
# Everything prepare writes, temporaries included: a directory holding only these is
# a previous (possibly interrupted) prepare output and may be overwritten.
OUTPUT_FILES = frozenset(
    {"meta.json", "meta.json.tmp"} | {f"{s}.npy{t}" for s in SPLITS for t in ("", ".tmp")}
)
BATCH_DOCS = 256  # documents tokenized together
FLUSH_TOKENS = 1 << 20  # tokens buffered per split before a write


def find_sources(inputs: list[str]) -> list[tuple[Path, str]]:
    """Lists the files to read.

    Args:
      inputs: files and directories. Directories are searched recursively for
        ``.txt``, ``.jsonl`` and ``.parquet`` files; other files in them are skipped.

    Returns:
      ``(absolute path, key)`` pairs, where the key (the path relative to the input it
      was found under) seeds the train/validation split, so the split does not depend
      on where the data lives.

    Raises:
      UserError: an input does not exist or has an unsupported extension, or no file
        was found.
    """
    sources = []
    for item in inputs:
        path = Path(item).expanduser().absolute()
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix in SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            sources += [(p, p.relative_to(path).as_posix()) for p in found]
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise UserError(
                    f"prepare: {path} has an unsupported extension; use {', '.join(SUFFIXES)}"
                )
            sources.append((path, path.name))
        else:
            raise UserError(f"prepare: input {path} does not exist")
    if not sources:
        raise UserError(f"prepare: no {', '.join(SUFFIXES)} files found in {inputs}")
    return sources


def _read_jsonl(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"prepare: {path}:{line_no} is not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f'prepare: {path}:{line_no} has no "text" string field')
            yield record["text"]


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            f"prepare: reading {path} needs pyarrow; pip install 'jaxtrain[parquet]'"
        ) from None
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid and OSError types
        raise UserError(f"prepare: {path} is not a Parquet file ({e})") from None
    if "text" not in file.schema_arrow.names:
        raise UserError(f'prepare: {path} has no "text" column')
    for batch in file.iter_batches(batch_size=1024, columns=["text"]):
        for text in batch.column(0).to_pylist():
            if text is not None:  # a null row is no document
                yield text


def read_documents(path: Path) -> Iterator[str]:
    """Yields the documents of one file: the whole .txt, each JSONL line, each row.

    Args:
      path: a ``.txt``, ``.jsonl`` (``text`` field per line) or ``.parquet`` (``text``
        column) file.

    Yields:
      The text of each document.

    Raises:
      UserError: a JSONL line is not JSON or lacks ``text``; a Parquet file lacks the
        ``text`` column or pyarrow is not installed.
    """
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    else:
        yield from _read_parquet(path)


def in_validation(seed: int, key: str, index: int, val_fraction: float) -> bool:
    """Whether document ``index`` of the source ``key`` belongs to validation.

    CRC32 rather than ``hash()`` so the split is the same in every process and run.
    """
    h = zlib.crc32(f"{seed}\0{key}\0{index}".encode())
    return h / 2**32 < val_fraction


class _NpyWriter:
    """Streams a 1-D array of unknown length into a ``.npy`` file."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.tokens = self.documents = 0
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._file = path.open("wb")
        self._write_header()
        self._data_start = self._file.tell()

    def _write_header(self) -> None:
        # NumPy pads the header so dimension 0 can grow to 21 digits in place, so the
        # final header has the same length as this placeholder one.
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.tokens,),
        }
        np.lib.format.write_array_header_1_0(self._file, header)

    def add(self, ids: np.ndarray) -> None:
        self._buffer.append(ids.astype(self.dtype, copy=False))
        self._buffered += len(ids)
        self.tokens += len(ids)
        if self._buffered >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            np.concatenate(self._buffer).tofile(self._file)
        self._buffer, self._buffered = [], 0

    def finish(self) -> None:
        self._flush()
        self._file.seek(0)
        self._write_header()
        assert self._file.tell() == self._data_start, "npy header changed length"
        self._file.close()

    def close(self) -> None:
        self._file.close()


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"prepare: output {out} exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        if foreign:
            raise UserError(
                f"prepare: output {out} is a non-empty directory that is not a prepare "
                f"output (it holds {foreign[0]}); choose another output directory"
            )


def _tokenizer_sha256(tokenizer: Tokenizer) -> str | None:
    if tokenizer.name == "byte":
        return None
    return hashlib.sha256(Path(tokenizer.name).read_bytes()).hexdigest()


def prepare(
    inputs: list[str],
    output: str,
    tokenizer: str = "byte",
    val_fraction: float = 0.01,
    seed: int = 0,
) -> dict:
    """Tokenizes documents into ``OUTPUT/{train,validation}.npy`` and ``meta.json``.

    Args:
      inputs: files and directories (searched recursively) of ``.txt``, ``.jsonl`` and
        ``.parquet`` documents.
      output: the output directory; created, or overwritten if it holds a previous
        prepare output.
      tokenizer: ``"byte"`` or the path of a ``tokenizer.json`` (see ``load_tokenizer``).
      val_fraction: the share of documents, chosen by hash, that go to validation. With
        two or more documents each split gets at least one.
      seed: changes which documents go to validation.

    Returns:
      The summary written to ``meta.json``.

    Raises:
      UserError: bad inputs, output, tokenizer or val_fraction.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"prepare: val_fraction {val_fraction} must be in [0, 1)")
    tok = load_tokenizer(tokenizer)
    sources = find_sources(inputs)
    out = Path(output).expanduser().absolute()
    _check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # no meta.json while the data changes

    dtype = token_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=np.int32)
    writers = {s: _NpyWriter(out / f"{s}.npy.tmp", dtype) for s in SPLITS}

    def write(ids: np.ndarray, split: str) -> None:
        writers[split].add(ids)
        writers[split].add(eos)
        writers[split].documents += 1

    def batches() -> Iterator[list[tuple[str, str, int]]]:
        batch = []
        for path, key in sources:
            for index, text in enumerate(read_documents(path)):
                batch.append((text, key, index))
                if len(batch) == BATCH_DOCS:
                    yield batch
                    batch = []
        if batch:
            yield batch

    try:
        # The last document is held back: if one split is still empty at the end, it
        # goes there, so both splits exist whenever there are two documents.
        pending: tuple[np.ndarray, str] | None = None
        for batch in batches():
            encoded = tok.encode_batch([text for text, _, _ in batch])
            for ids, (_, key, index) in zip(encoded, batch, strict=True):
                if pending is not None:
                    write(*pending)
                split = "validation" if in_validation(seed, key, index, val_fraction) else "train"
                pending = (ids, split)
        if pending is not None:
            ids, split = pending
            if writers["train"].documents == 0:
                split = "train"
            elif writers["validation"].documents == 0:
                split = "validation"
            write(ids, split)
        for writer in writers.values():
            writer.finish()
    finally:
        for writer in writers.values():
            writer.close()

    for s in SPLITS:
        os.replace(out / f"{s}.npy.tmp", out / f"{s}.npy")
    meta = {
        "format": 1,
        "tokenizer": tok.name,
        "tokenizer_sha256": _tokenizer_sha256(tok),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "seed": seed,
        "splits": {
            s: {"tokens": writers[s].tokens, "documents": writers[s].documents} for s in SPLITS
        },
        "sources": [str(path) for path, _ in sources],
    }
    (out / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(out / "meta.json.tmp", out / "meta.json")
    return meta

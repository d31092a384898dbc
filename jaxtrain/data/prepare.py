"""``jaxtrain prepare``: text, JSONL and Parquet files -> packed token files.

The output directory holds what ``loader.open_dataset`` memory-maps:

- ``train.npy`` and ``validation.npy``: 1-D ``uint16`` (or ``uint32`` for vocabularies
  over 65535 ids) token arrays, every document followed by EOS, the packed-sequence
  layout of GPT-2 (Radford et al., 2019) and nanoGPT. Plain ``.npy`` (NEP 1), so they
  open with ``np.load(mmap_mode="r", allow_pickle=False)`` and nothing is unpickled.
- ``meta.json``: the tokenizer, vocabulary size, EOS id, largest id, dtype, per-split
  token and document counts, the source files and what was skipped. It is written last.

Everything is written into a temporary sibling directory that replaces the output only
once it is complete (a rename), so a failing or interrupted prepare never touches an
existing dataset; replacing one needs ``overwrite``.

Input must be UTF-8: a ``.txt`` file or JSONL line that is not is skipped and counted
rather than decoded with replacement characters, and documents with no tokens are
dropped, so an input that is all skipped fails instead of writing an empty dataset.

Memory stays bounded: documents are read and tokenized in batches and streamed to disk;
only the ``.npy`` header is rewritten at the end, once the token count is known.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxtrain.data.tokenizer import Tokenizer, load_tokenizer, token_dtype
from jaxtrain.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".parquet")
SPLITS = ("train", "validation")
# Everything prepare writes, and the temporaries earlier versions wrote in place: a
# directory holding only these is a previous prepare output.
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
        elif path.exists():
            raise UserError(f"prepare: input {path} is not a regular file or directory")
        else:
            raise UserError(f"prepare: input {path} does not exist")
    if not sources:
        raise UserError(f"prepare: no {', '.join(SUFFIXES)} files found in {inputs}")
    return sources


@dataclasses.dataclass
class Skipped:
    """What ``prepare`` left out, for the summary."""

    not_utf8_files: list[str] = dataclasses.field(default_factory=list)
    not_utf8_lines: int = 0
    first_not_utf8_line: str | None = None
    empty_documents: int = 0

    def summary(self) -> dict:
        """The ``skipped`` entry of ``meta.json``."""
        return {
            "not_utf8_files": self.not_utf8_files,
            "not_utf8_lines": {"count": self.not_utf8_lines, "first": self.first_not_utf8_line},
            "empty_documents": self.empty_documents,
        }


def _read_error(path: Path, e: Exception) -> UserError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
    return UserError(f"prepare: cannot read {path} ({reason[:100]})")


def _read_jsonl(path: Path, skipped: Skipped) -> Iterator[str]:
    try:
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    skipped.not_utf8_lines += 1
                    skipped.first_not_utf8_line = skipped.first_not_utf8_line or f"{path}:{line_no}"
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"prepare: {path}:{line_no} is not valid JSON") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise UserError(f'prepare: {path}:{line_no} has no "text" string field')
                yield record["text"]
    except OSError as e:
        raise _read_error(path, e) from None


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            f"prepare: reading {path} needs pyarrow; pip install 'jaxtrain[parquet]'"
        ) from None
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid and OSError types
        raise UserError(f"prepare: {path} is not a Parquet file ({str(e)[:100]})") from None
    if "text" not in file.schema_arrow.names:
        raise UserError(f'prepare: {path} has no "text" column')
    try:
        for batch in file.iter_batches(batch_size=1024, columns=["text"]):
            for text in batch.column(0).to_pylist():
                if text is None:  # a null row is no document
                    continue
                if not isinstance(text, str):
                    raise UserError(f'prepare: {path} column "text" does not hold strings')
                yield text
    except (OSError, pa.ArrowException) as e:
        raise _read_error(path, e) from None


def read_documents(path: Path, skipped: Skipped | None = None) -> Iterator[str]:
    """Yields the documents of one file: the whole .txt, each JSONL line, each row.

    Args:
      path: a ``.txt``, ``.jsonl`` (``text`` field per line) or ``.parquet`` (``text``
        column) file.
      skipped: counts the ``.txt`` files and JSONL lines that are not UTF-8, which are
        skipped (Parquet strings are UTF-8 by format).

    Yields:
      The text of each document.

    Raises:
      UserError: the file cannot be read; a JSONL line is not JSON or lacks ``text``; a
        Parquet file lacks the ``text`` column or pyarrow is not installed.
    """
    skipped = Skipped() if skipped is None else skipped
    if path.suffix == ".txt":
        try:
            data = path.read_bytes()
        except OSError as e:
            raise _read_error(path, e) from None
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError:
            skipped.not_utf8_files.append(str(path))
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path, skipped)
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
        self.max_id = -1
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
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))
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


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"prepare: --output {out} exists and is not a directory")
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if n not in OUTPUT_FILES]
    if foreign:
        raise UserError(
            f"prepare: --output {out} is a non-empty directory that is not a prepare "
            f"output (it holds {foreign[0]}); choose another output directory"
        )
    if names and not overwrite:
        raise UserError(
            f"prepare: --output {out} already holds a dataset; pass --overwrite to replace it"
        )


def _swap_in(new: Path, out: Path) -> None:
    """Renames the finished dataset ``new`` to ``out``, a sibling on the same filesystem.

    An existing ``out`` is first renamed aside and deleted only once ``new`` is in place;
    if that rename fails, it is put back.
    """
    if not out.exists():
        os.rename(new, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
    old = aside / out.name
    try:
        os.rename(out, old)
        try:
            os.rename(new, out)
        except BaseException:
            os.rename(old, out)
            raise
    except BaseException:
        # The old dataset is back at `out`, or, if even that rename failed, still in
        # `aside`, which is then kept rather than deleted.
        if not old.exists():
            shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)  # the replaced dataset


def _tokenizer_sha256(tokenizer: Tokenizer) -> str | None:
    if tokenizer.name == "byte":
        return None
    return hashlib.sha256(Path(tokenizer.name).read_bytes()).hexdigest()


def _describe(inputs: list[str]) -> str:
    """The inputs for an error line, bounded."""
    more = f" and {len(inputs) - 1} more" if len(inputs) > 1 else ""
    return f"{inputs[0]}{more}" if inputs else "(no inputs)"


def prepare(
    inputs: list[str],
    output: str,
    tokenizer: str = "byte",
    val_fraction: float = 0.01,
    seed: int = 0,
    *,
    eos_id: int = -1,
    overwrite: bool = False,
) -> dict:
    """Tokenizes documents into ``OUTPUT/{train,validation}.npy`` and ``meta.json``.

    Args:
      inputs: files and directories (searched recursively) of ``.txt``, ``.jsonl`` and
        ``.parquet`` documents.
      output: the output directory; created, or replaced when it holds a previous
        prepare output and ``overwrite`` is set.
      tokenizer: ``"byte"`` or the path of a ``tokenizer.json`` (see ``load_tokenizer``).
      val_fraction: the share of documents, chosen by hash, that go to validation. With
        two or more documents each split gets at least one.
      seed: changes which documents go to validation.
      eos_id: the document separator; -1: the tokenizer's own (see ``load_tokenizer``).
      overwrite: replace an existing prepare output.

    Returns:
      The summary written to ``meta.json``.

    Raises:
      UserError: bad inputs, output, tokenizer or val_fraction; no document with text.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"prepare: val_fraction {val_fraction} must be in [0, 1)")
    tok = load_tokenizer(tokenizer, eos_id=eos_id)
    sources = find_sources(inputs)
    out = Path(output).expanduser().resolve()
    _check_output(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise UserError(f"prepare: cannot create --output {out} ({e.strerror})") from None
    try:
        meta = _write(tok, sources, work, val_fraction, seed, inputs)
        _swap_in(work, out)
    except OSError as e:
        raise UserError(f"prepare: cannot write --output {out} ({e.strerror})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta


def prepare_warnings(meta: dict) -> list[str]:
    """What a user should hear about a finished prepare: skipped input, no validation.

    Args:
      meta: the summary ``prepare`` returned.

    Returns:
      One line per warning.
    """
    skipped, warnings = meta["skipped"], []
    files, lines = skipped["not_utf8_files"], skipped["not_utf8_lines"]
    if files:
        more = " ..." if len(files) > 1 else ""
        warnings.append(f"skipped {len(files)} files that are not UTF-8: {files[0]}{more}")
    if lines["count"]:
        warnings.append(
            f"skipped {lines['count']} JSONL lines that are not UTF-8: {lines['first']} ..."
        )
    if skipped["empty_documents"]:
        warnings.append(f"skipped {skipped['empty_documents']} empty documents")
    if meta["splits"]["validation"]["documents"] == 0:
        warnings.append(
            "the validation split is empty (one document) and training refuses it; give "
            "prepare two or more documents"
        )
    return warnings


def _write(
    tok: Tokenizer,
    sources: list[tuple[Path, str]],
    out: Path,
    val_fraction: float,
    seed: int,
    inputs: list[str],
) -> dict:
    """Writes the splits and then ``meta.json`` into the fresh directory ``out``."""
    dtype = token_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=np.int32)
    skipped = Skipped()
    writers: dict[str, _NpyWriter] = {}

    def write(ids: np.ndarray, split: str) -> None:
        writers[split].add(ids)
        writers[split].add(eos)
        writers[split].documents += 1

    def batches() -> Iterator[list[tuple[str, str, int]]]:
        batch = []
        for path, key in sources:
            for index, text in enumerate(read_documents(path, skipped)):
                batch.append((text, key, index))
                if len(batch) == BATCH_DOCS:
                    yield batch
                    batch = []
        if batch:
            yield batch

    try:
        for s in SPLITS:
            writers[s] = _NpyWriter(out / f"{s}.npy", dtype)
        # The last document is held back: if one split is still empty at the end, it
        # goes there, so both splits exist whenever there are two documents.
        pending: tuple[np.ndarray, str] | None = None
        for batch in batches():
            encoded = tok.encode_batch([text for text, _, _ in batch])
            for ids, (_, key, index) in zip(encoded, batch, strict=True):
                if len(ids) == 0:  # an empty document would only add an EOS
                    skipped.empty_documents += 1
                    continue
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

    if writers["train"].documents == 0:
        raise UserError(
            f"prepare: no document with text in --input {_describe(inputs)} "
            f"({len(skipped.not_utf8_files)} files and {skipped.not_utf8_lines} JSONL "
            f"lines skipped as not UTF-8, {skipped.empty_documents} empty documents)"
        )
    meta = {
        "format": 1,
        "tokenizer": tok.name,
        "tokenizer_sha256": _tokenizer_sha256(tok),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "max_id": max(w.max_id for w in writers.values()),
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "seed": seed,
        "splits": {
            s: {"tokens": writers[s].tokens, "documents": writers[s].documents} for s in SPLITS
        },
        "sources": [str(path) for path, _ in sources],
        "skipped": skipped.summary(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last
    return meta

"""The built-in corpus: the Python standard library's own source code.

Every Python install ships ~14 MB of real, varied, human-written text in the standard
library, so ``jaxtrain train`` with no arguments has data to learn from on any machine
with no download and no file written. Test suites are left out (they are repetitive and
some are generated), and so are installed third-party packages, which differ between
machines.

The split is by file, so no validation window overlaps a training file: a file goes to
validation when ``crc32(relative path) % 100 < VALIDATION_PERCENT``. CRC32 of the path is
stable across runs, machines and Python versions (unlike ``hash``), so the split only
changes when the stdlib's file list does.
"""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from jaxtrain.data.dataset import TokenDataset
from jaxtrain.data.tokenizer import Tokenizer, load_tokenizer, token_dtype

VALIDATION_PERCENT = 3
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _in_validation(relpath: str) -> bool:
    return zlib.crc32(relpath.encode("utf-8")) % 100 < VALIDATION_PERCENT


def corpus_files(root: Path | None = None) -> dict[str, list[str]]:
    """Lists the corpus files of each split.

    Args:
      root: the directory to scan; defaults to ``stdlib_root()``.

    Returns:
      ``{"train": [...], "validation": [...]}``: POSIX paths relative to ``root``, in
      sorted order. Validation is never empty when there are two or more files.
    """
    root = stdlib_root() if root is None else root
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        files.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    files.sort()
    splits = {
        "train": [f for f in files if not _in_validation(f)],
        "validation": [f for f in files if _in_validation(f)],
    }
    if not splits["validation"] and len(files) >= 2:
        # A stdlib this small is not a real install; still keep eval meaningful.
        moved = min(files, key=lambda f: zlib.crc32(f.encode("utf-8")))
        splits["train"].remove(moved)
        splits["validation"].append(moved)
    return splits


def _tokenize_files(root: Path, relpaths: list[str], tokenizer: Tokenizer) -> np.ndarray:
    texts = [(root / f).read_bytes().decode("utf-8", errors="replace") for f in relpaths]
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    parts = []
    for ids in tokenizer.encode_batch(texts):
        parts += [ids, eos]
    tokens = np.concatenate(parts).astype(token_dtype(tokenizer.vocab_size))
    tokens.flags.writeable = False  # the cached array is shared by every caller
    return tokens


@functools.lru_cache(maxsize=4)
def _builtin_corpus(tokenizer_name: str, eos_id: int) -> TokenDataset:
    tokenizer = load_tokenizer(tokenizer_name, eos_id=eos_id)
    root = stdlib_root()
    splits = corpus_files(root)
    return TokenDataset(
        train=_tokenize_files(root, splits["train"], tokenizer),
        validation=_tokenize_files(root, splits["validation"], tokenizer),
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        source=(
            f"built-in corpus: Python {sysconfig.get_python_version()} stdlib source at "
            f"{root} ({len(splits['train'])} train / {len(splits['validation'])} "
            "validation files)"
        ),
    )


def builtin_corpus(tokenizer: Tokenizer) -> TokenDataset:
    """Tokenizes the standard library's source, once per tokenizer per process.

    Args:
      tokenizer: the tokenizer; it is cached by its name and EOS id, so it must be one
        that ``load_tokenizer(tokenizer.name, eos_id=tokenizer.eos_id)`` rebuilds.

    Returns:
      The train and validation tokens (read-only), each file followed by EOS.
    """
    return _builtin_corpus(tokenizer.name, tokenizer.eos_id)

"""Data: tokenizers, the built-in corpus, ``prepare`` and the sharded batch loader."""

from jaxtrain.data.corpus import builtin_corpus, corpus_files
from jaxtrain.data.loader import Loader, TokenDataset, open_dataset, process_rows, sample_windows
from jaxtrain.data.prepare import prepare
from jaxtrain.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    token_dtype,
)

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "Loader",
    "TokenDataset",
    "Tokenizer",
    "builtin_corpus",
    "corpus_files",
    "load_tokenizer",
    "open_dataset",
    "prepare",
    "process_rows",
    "sample_windows",
    "token_dtype",
]

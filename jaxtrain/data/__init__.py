"""Data: tokenizers, the built-in corpus, ``prepare`` and the sharded batch loader."""

from jaxtrain.data.corpus import builtin_corpus, corpus_files
from jaxtrain.data.loader import (
    Loader,
    TokenDataset,
    batch_dtypes,
    document_boundaries,
    open_dataset,
    process_rows,
    sample_windows,
)
from jaxtrain.data.objectives import Objective, corrupt_spans, mask_tokens, span_lengths
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
    "Objective",
    "TokenDataset",
    "Tokenizer",
    "batch_dtypes",
    "builtin_corpus",
    "corrupt_spans",
    "corpus_files",
    "document_boundaries",
    "load_tokenizer",
    "mask_tokens",
    "open_dataset",
    "prepare",
    "process_rows",
    "sample_windows",
    "span_lengths",
    "token_dtype",
]

"""Data: tokenizers, the built-in corpus, ``prepare`` and the sharded batch loader."""

from jaxtrain.data.corpus import builtin_corpus, corpus_files
from jaxtrain.data.dataset import TokenDataset, check_dataset, open_dataset
from jaxtrain.data.loader import (
    Loader,
    batch_dtypes,
    document_boundaries,
    process_rows,
    sample_windows,
)
from jaxtrain.data.objectives import Objective, corrupt_spans, mask_tokens, span_lengths
from jaxtrain.data.prefetch import Prefetcher
from jaxtrain.data.prepare import prepare, prepare_warnings
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
    "Prefetcher",
    "TokenDataset",
    "Tokenizer",
    "batch_dtypes",
    "builtin_corpus",
    "check_dataset",
    "corrupt_spans",
    "corpus_files",
    "document_boundaries",
    "load_tokenizer",
    "mask_tokens",
    "open_dataset",
    "prepare",
    "prepare_warnings",
    "process_rows",
    "sample_windows",
    "span_lengths",
    "token_dtype",
]

"""Beam search equals transformers' ``generate(num_beams=4)`` on a decoder (llama) and
an encoder-decoder (T5): the best hypothesis of each left-padded prompt, token for
token, with and without hypotheses ending early at EOS, and with a length penalty that
changes which of them wins."""

import functools

import numpy as np
import pytest
from flax import nnx
from helpers.hf import FIXTURES, fixture_prompts, transformers_generate

from jaxtrain.generate.beam import BeamConfig, beam_search
from jaxtrain.models import from_pretrained

NEW = 8


@functools.cache
def split(name):
    directory = FIXTURES / name
    _, model = from_pretrained(directory)
    return directory, *nnx.split(model)


def run(name, beams, eos):
    directory, graphdef, state = split(name)
    rows, pad = fixture_prompts(directory)
    tokens, lengths, _ = beam_search(
        graphdef, state, rows, pad, max_new=NEW, beams=beams, eos_id=eos, pad_id=0
    )
    want = transformers_generate(
        directory, rows, pad, num_beams=beams.num_beams, length_penalty=beams.length_penalty,
        early_stopping=beams.early_stopping, max_new_tokens=NEW, eos_token_id=eos,
    )  # fmt: skip
    best, length = np.asarray(tokens)[:, 0], np.asarray(lengths)[:, 0]
    # transformers crops to the longest best hypothesis and fills the rest (with the EOS:
    # its fill is `pad_token_id or eos`); ours are filled with pad_id.
    assert want.shape[1] == length.max()
    for row, expected, n in zip(best, want, length, strict=True):
        np.testing.assert_array_equal(row[:n], expected[:n])
        assert (row[n:] == 0).all()
    return best, np.asarray(lengths)


DEFAULT = BeamConfig(num_beams=4)
SHORT = BeamConfig(num_beams=4, length_penalty=-2.0, early_stopping=True)


@pytest.mark.parametrize(
    "name, beams",
    [("llama", DEFAULT), ("llama", SHORT), ("t5", DEFAULT)],
    ids=["llama", "llama-short", "t5"],
)
def test_beam_search_equals_transformers(name, beams):
    best, lengths = run(name, beams, eos=None)
    assert (lengths == NEW).all()
    # An EOS the beams meet: the first row's third token. Hypotheses now end early; with
    # a negative length penalty the first row's best one is such a short one.
    eos = int(best[0, 2])
    _, lengths = run(name, beams, eos=eos)
    assert (lengths[0, 0] < NEW) == (beams.length_penalty < 0)

"""Training objectives: BERT's masking rates, T5's span corruption (which must give back
the original text), determinism in (seed, step), the loader's batches for each objective
and the config checks that pair families with objectives."""

import numpy as np
import pytest
from tiny import TINY

from jaxtrain import config
from jaxtrain.data import (
    Objective,
    TokenDataset,
    corrupt_spans,
    document_boundaries,
    mask_tokens,
    span_lengths,
)
from jaxtrain.data.objectives import row_rng
from jaxtrain.errors import UserError
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program

EOS, VOCAB = 256, 257  # the byte tokenizer's


def windows(rows: int, length: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (rows, length)).astype(np.int32)
    tokens[rng.random(tokens.shape) < 0.05] = EOS
    return tokens


def test_mask_rates_and_what_is_left_alone():
    tokens = windows(400, 256)
    ids = {"vocab_size": VOCAB, "mask_id": 511, "eos_id": EOS}
    rows = [mask_tokens(t, row_rng(0, 0, 3, r), **ids) for r, t in enumerate(tokens)]
    inputs = np.stack([r["inputs"] for r in rows])
    selected = np.stack([r["weights"] for r in rows]) == 1
    for row, got in zip(tokens, rows, strict=True):
        np.testing.assert_array_equal(got["targets"], row)
        assert got["weights"].sum() == round(0.15 * (row != EOS).sum())  # 15% of the text
    assert not selected[tokens == EOS].any()  # EOS is never selected
    np.testing.assert_array_equal(inputs[~selected], tokens[~selected])
    masked = (inputs == 511)[selected].mean()
    random = ((inputs != 511) & (inputs != tokens))[selected].mean()
    kept = (inputs == tokens)[selected].mean()
    # ~14,600 selected tokens: 0.8 / 0.1 / 0.1 within 6 standard deviations.
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1 - 0.1 / VOCAB) < 0.015, (masked, kept)
    assert abs(random - 0.1) < 0.015, random


def test_span_lengths_are_t5s():
    assert span_lengths(512) == (568, 114)  # T5's random_spans_helper for 512 inputs
    assert span_lengths(16) == (17, 5)
    with pytest.raises(UserError, match="^data.seq_len: "):
        span_lengths(2)


@pytest.mark.parametrize("seq_len", [16, 64, 512])
def test_span_corruption_gives_back_the_original_tokens(seq_len):
    raw, decoder = span_lengths(seq_len)
    noise_total, span_total = 0, 0
    for r, tokens in enumerate(windows(50, raw, seed=seq_len)):
        ids = {"eos_id": EOS, "sentinel_id": 500, "decoder_start_id": 7}
        out = corrupt_spans(tokens, row_rng(1, 0, 7, r), **ids)
        inputs, targets = out["inputs"], out["targets"]
        assert inputs.shape == (seq_len,) and targets.shape == (decoder,)
        assert inputs[-1] == EOS and targets[-1] == EOS
        np.testing.assert_array_equal(out["decoder_inputs"], [7, *targets[:-1]])
        # Each sentinel in the input stands for the tokens after it in the targets.
        is_sentinel = targets[:-1] > 256
        spans = np.split(targets[:-1], np.flatnonzero(is_sentinel)[1:])
        fills = {span[0]: span[1:] for span in spans}
        assert list(fills) == list(range(500, 500 - len(fills), -1))  # counting down
        rebuilt = np.concatenate([fills.get(t, [t]) for t in inputs[:-1]])
        np.testing.assert_array_equal(rebuilt, tokens)
        noise_total += len(targets) - 1 - len(fills)
        span_total += len(fills)
        assert all(len(f) > 0 for f in fills.values())
    assert noise_total == 50 * round(0.15 * raw)  # 15% of the tokens corrupted...
    assert abs(noise_total / span_total - 3) < 0.5  # ...in spans of mean length 3


def test_objectives_are_functions_of_seed_and_step_and_row():
    for objective in (Objective("mlm", mask_id=511), Objective("span_corruption", 0, 400, 0)):
        length = objective.window(64)
        local = {"inputs": windows(8, length)}
        kwargs = {"seed": 5, "stream": 0, "vocab_size": VOCAB, "eos_id": EOS}
        first = objective(dict(local), step=3, rows=range(8), **kwargs)
        again = objective(dict(local), step=3, rows=range(8), **kwargs)
        other = objective(dict(local), step=4, rows=range(8), **kwargs)
        part = objective({"inputs": local["inputs"][4:]}, step=3, rows=range(4, 8), **kwargs)
        for key, value in first.items():
            np.testing.assert_array_equal(value, again[key])
            np.testing.assert_array_equal(value[4:], part[key])  # another process's rows
        assert not np.array_equal(first["inputs"], other["inputs"])


def test_loader_batches_match_the_programs_abstract_batch():
    """MLM (packed: documents kept apart, weights the selected tokens) and T5's span
    corruption (decoder arrays of their own length), sharded over 8 devices."""
    tokens = windows(1, 6000)[0].astype(np.uint16)
    ds = TokenDataset(
        train=tokens, validation=tokens[:900], vocab_size=VOCAB, eos_id=EOS, source="t"
    )
    for extra in (
        ("model.family=bert", "train.objective=mlm", "data.packing=true"),
        ("model.family=t5", "train.objective=span_corruption", "data.seq_len=64"),
    ):
        cfg = config.load(None, [*TINY, "model.vocab_size=512", *extra])
        program = build_program(cfg, make_mesh(cfg))
        loader = program.loader(ds)
        batch, want = loader.train_batch(2), program.abstract_batch()
        assert batch.keys() == want.keys()
        for key, value in batch.items():
            spec = want[key]
            assert value.shape == spec.shape and value.dtype == spec.dtype, key
            assert value.sharding == spec.sharding, key
        if cfg.train.objective == "mlm":
            inputs = np.asarray(batch["inputs"])
            original = np.asarray(batch["targets"])
            boundaries = document_boundaries(original, EOS)
            for key in ("segment_ids", "positions"):
                np.testing.assert_array_equal(np.asarray(batch[key]), boundaries[key])
            changed = inputs != original
            assert (np.asarray(batch["weights"])[changed] == 1).all() and changed.any()
            assert (inputs == 511).any()  # model.mask_id defaults to vocab_size - 1
        else:
            assert batch["decoder_inputs"].shape == (8, span_lengths(64)[1])
            assert (np.asarray(batch["inputs"]) == 511).any()  # the first sentinel


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.family=bert"], "train.objective"),  # causal_lm by default
        (["train.objective=mlm"], "train.objective"),  # a llama model
        (["model.family=t5", "train.objective=mlm"], "train.objective"),
        (["train.objective=denoise"], "train.objective"),
        (
            ["model.family=t5", "train.objective=span_corruption", "data.packing=true"],
            "data.packing",
        ),
        (["model.mask_id=512"], "model.mask_id"),
        (["model.sentinel_id=-2"], "model.sentinel_id"),
    ],
)
def test_objective_config_errors_name_the_key(overrides, key):
    with pytest.raises(UserError, match=f"^{key}: ") as err:
        config.load(None, [*TINY, *overrides])
    assert "\n" not in str(err.value)


def test_special_ids_default_to_the_top_of_the_vocab_and_must_not_be_eos():
    t5 = ("model.family=t5", "train.objective=span_corruption", "data.seq_len=64")
    cfg = config.load(None, [*TINY, *t5])
    assert cfg.model.mask_id == cfg.model.sentinel_id == 127 and cfg.model.pad_id == 0
    assert config.from_dict(cfg.to_dict()) == cfg  # the filled-in ids are spelled out
    tokens = windows(1, 3000)[0].astype(np.uint16) % 120
    ds = TokenDataset(train=tokens, validation=tokens, vocab_size=120, eos_id=125, source="t")
    program = build_program(cfg, make_mesh(cfg))
    with pytest.raises(UserError, match="^model.sentinel_id: "):
        program.loader(ds)  # 3 sentinels, 127 down to 125, would include EOS
    bert = config.load(
        None, [*TINY, "model.family=bert", "train.objective=mlm", "model.mask_id=125"]
    )
    with pytest.raises(UserError, match="^model.mask_id: "):
        build_program(bert, make_mesh(bert)).loader(ds)

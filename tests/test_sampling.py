"""Token sampling (jaxtrain/generate/sampling.py): the repetition penalty, top-k and top-p
match NumPy references written from transformers' algorithms, ties and edge values
included, and transformers' own processors; top-k 1 is greedy; draws are reproducible
per key and follow the tempered softmax; ``sample`` runs jitted inside a
``lax.while_loop``; bad settings raise a one-line ``UserError`` naming the key."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.errors import UserError
from jaxtrain.generate.sampling import (
    SamplingConfig,
    mark_seen,
    process_logits,
    repetition_penalty,
    sample,
    seen_mask,
    top_k_filter,
    top_p_filter,
)

B, V = 4, 11
sample_jit = jax.jit(sample, static_argnames="config")


def random_logits(seed: int = 0, shape: tuple[int, int] = (B, V), scale: float = 2.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# Whole-number logits: many ties, some of them straddling the top-k and top-p cuts.
TIED = np.round(random_logits(1))
UNIFORM = np.zeros((1, 4), np.float32)  # probabilities 1/4 each: cut points land exactly
LOGIT_CASES = {"random": random_logits(0), "tied": TIED, "uniform": UNIFORM}


def ref_top_k(x: np.ndarray, k: int) -> np.ndarray:
    k = min(k, x.shape[-1])
    kth = np.sort(x, axis=-1)[:, -k][:, None]
    return np.where(x < kth, -np.inf, x).astype(np.float32)


def ref_top_p(x: np.ndarray, top_p: float) -> np.ndarray:
    out = x.copy()
    for row in range(x.shape[0]):
        order = np.argsort(x[row], kind="stable")  # ascending, ties by token id
        ascending = x[row][order]
        probs = np.exp(ascending - ascending.max())
        cumulative = np.cumsum(probs / probs.sum())
        remove = cumulative <= np.float32(1 - top_p)
        remove[-1] = False  # the most probable token always stays
        out[row, order[remove]] = -np.inf
    return out


def ref_repetition(x: np.ndarray, ids: np.ndarray, penalty: float) -> np.ndarray:
    out = x.copy()
    for row in range(x.shape[0]):
        for token in set(ids[row].tolist()):
            value = x[row, token]
            out[row, token] = value * penalty if value < 0 else value / penalty
    return out


def assert_same_logits(actual, expected):
    actual = np.asarray(actual)
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


@pytest.mark.parametrize("case", LOGIT_CASES)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 10, 11, 50])
def test_top_k_matches_reference(case, k):
    x = LOGIT_CASES[case]
    assert_same_logits(top_k_filter(jnp.asarray(x), k), ref_top_k(x, k))


def test_top_k_edges():
    x = TIED
    np.testing.assert_array_equal(top_k_filter(jnp.asarray(x), 0), x)  # off
    np.testing.assert_array_equal(top_k_filter(jnp.asarray(x), V + 5), x)  # clipped to V
    kept = np.isfinite(np.asarray(top_k_filter(jnp.asarray(x), 1)))
    np.testing.assert_array_equal(kept, x == x.max(axis=-1, keepdims=True))  # ties kept


@pytest.mark.parametrize("case", LOGIT_CASES)
@pytest.mark.parametrize("top_p", [1e-6, 0.1, 0.25, 0.5, 0.6, 0.75, 0.9, 0.99])
def test_top_p_matches_reference(case, top_p):
    x = LOGIT_CASES[case]
    assert_same_logits(top_p_filter(jnp.asarray(x), top_p), ref_top_p(x, top_p))


def test_top_p_edges():
    x = random_logits(2)
    np.testing.assert_array_equal(top_p_filter(jnp.asarray(x), 1.0), x)  # off
    kept = np.isfinite(np.asarray(top_p_filter(jnp.asarray(x), 1e-6)))
    np.testing.assert_array_equal(kept, np.eye(V, dtype=bool)[x.argmax(-1)])  # argmax only
    # Uniform over 4: cumulative 1/4, 1/2, 3/4, 1 exactly. At top_p = 1/2 the second token's
    # 1/2 <= 1 - 1/2 is removed (<=, not <); ties go in token order, lower ids first.
    kept = np.isfinite(np.asarray(top_p_filter(jnp.asarray(UNIFORM), 0.5)))
    np.testing.assert_array_equal(kept, [[False, False, True, True]])
    # A row already filtered by top-k keeps its -inf and stays sampleable.
    filtered = top_p_filter(top_k_filter(jnp.asarray(x), 3), 0.9)
    assert_same_logits(filtered, ref_top_p(ref_top_k(x, 3), 0.9))
    assert np.isfinite(np.asarray(jax.nn.softmax(filtered))).all()


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_reference(penalty):
    x = random_logits(3)
    x[:, 0] = 0.0  # zero is divided, as transformers does
    ids = np.random.default_rng(4).integers(0, V, size=(B, 7))
    ids[:, 0] = 0
    seen = seen_mask(jnp.asarray(ids), V)
    assert_same_logits(
        repetition_penalty(jnp.asarray(x), seen, penalty), ref_repetition(x, ids, penalty)
    )
    assert (x < 0).any() and (x > 0).any()


def test_seen_mask_padding_and_updates():
    ids = jnp.array([[7, 7, 1, 2], [3, 4, 4, 5]])
    valid = jnp.array([[False, False, True, True], [True, True, True, True]])  # left padding
    seen = seen_mask(ids, 8, valid)
    expected = np.zeros((2, 8), bool)
    expected[0, [1, 2]] = True
    expected[1, [3, 4, 5]] = True
    np.testing.assert_array_equal(seen, expected)
    expected[0, 6] = expected[1, 3] = True
    np.testing.assert_array_equal(mark_seen(seen, jnp.array([6, 3])), expected)


def test_top_k_one_is_greedy():
    x = jnp.asarray(random_logits(5, (8, 50)))
    greedy = sample_jit(x, jax.random.key(0), None, SamplingConfig(greedy=True))
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(x), -1))
    top1 = SamplingConfig(top_k=1, temperature=0.7)
    for seed in range(20):
        np.testing.assert_array_equal(sample_jit(x, jax.random.key(seed), None, top1), greedy)


def test_greedy_applies_only_the_penalty():
    x = jnp.array([[2.0, 2.0, 1.0, -3.0]])
    seen = jnp.array([[True, False, False, False]])
    config = SamplingConfig(greedy=True, repetition_penalty=1.5, top_p=0.3, temperature=0.5)
    assert int(sample(x, jax.random.key(0), seen, config)[0]) == 1
    # Without the penalty the tie goes to the first, as torch's argmax does; top-p would
    # have removed it, but greedy skips the warpers, as generate(do_sample=False) does.
    config = SamplingConfig(greedy=True, top_p=0.3)
    assert int(sample(x, jax.random.key(0), None, config)[0]) == 0


def test_draws_are_reproducible_per_key():
    x = jnp.zeros((64, V))
    config = SamplingConfig()
    first = sample_jit(x, jax.random.key(1), None, config)
    assert first.dtype == jnp.int32 and first.shape == (64,)
    np.testing.assert_array_equal(first, sample_jit(x, jax.random.key(1), None, config))
    assert (first != sample_jit(x, jax.random.key(2), None, config)).any()


def test_frequencies_follow_tempered_softmax():
    logits = np.array([0.5, -1.0, 1.2, 0.1], np.float32)
    draws = 20_000  # standard error of each frequency <= 0.0036
    x = jnp.tile(jnp.asarray(logits), (draws, 1))
    tokens = sample_jit(x, jax.random.key(0), None, SamplingConfig(temperature=0.7))
    freq = np.bincount(np.asarray(tokens), minlength=4) / draws
    probs = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    np.testing.assert_allclose(freq, probs, atol=0.02)


def test_sample_in_a_while_loop():
    """The decode loop's shape: the seen mask is carried and updated, config is static."""
    config = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.2)
    prompt = jnp.array([[1, 2, 3], [4, 4, 5]])
    x = jnp.asarray(random_logits(6, (2, V)))

    @jax.jit
    def decode(key):
        def body(carry):
            step, seen, out = carry
            tokens = sample(x, jax.random.fold_in(key, step), seen, config)
            return step + 1, mark_seen(seen, tokens), out.at[:, step].set(tokens)

        init = (0, seen_mask(prompt, V), jnp.zeros((2, 6), jnp.int32))
        return jax.lax.while_loop(lambda c: c[0] < 6, body, init)

    _, seen, out = decode(jax.random.key(0))
    assert ((out >= 0) & (out < V)).all()
    assert np.asarray(seen)[np.arange(2)[:, None], np.asarray(out)].all()


@pytest.mark.parametrize(
    "key, value",
    [
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("temperature", math.inf),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.2),
        ("greedy", "yes"),
    ],
)
def test_bad_config_names_the_key(key, value):
    with pytest.raises(UserError, match=rf"^generate\.{key}: must ") as error:
        SamplingConfig(**{key: value})
    assert "\n" not in str(error.value)
    hash(SamplingConfig(top_k=3, top_p=0.5))  # a static jit argument must hash


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.3),
        SamplingConfig(temperature=1.6, top_k=2, repetition_penalty=0.7),
        SamplingConfig(top_p=0.3),
    ],
)
def test_matches_transformers(config):
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    x = random_logits(7, (B, 50))  # continuous: no ties, whose order torch leaves open
    ids = np.random.default_rng(8).integers(0, 50, size=(B, 12))
    pads = np.array([0, 3, 0, 5])  # left padding, which transformers does not penalise
    valid = np.arange(12)[None, :] >= pads[:, None]
    processors = [
        RepetitionPenaltyLogitsProcessor(
            config.repetition_penalty, prompt_ignore_length=torch.tensor(pads)
        ),
        TemperatureLogitsWarper(config.temperature),
        TopKLogitsWarper(config.top_k) if config.top_k else None,
        TopPLogitsWarper(config.top_p),
    ]
    hf = LogitsProcessorList([p for p in processors if p is not None])
    expected = hf(torch.tensor(ids), torch.tensor(x)).numpy()
    seen = seen_mask(jnp.asarray(ids), 50, jnp.asarray(valid))
    assert_same_logits(process_logits(jnp.asarray(x), seen, config), expected)

"""Every attention implementation equals the plain-XLA reference, forward and gradients;
the reference itself follows the definition of the mask."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.bounds import relative_error

from jaxtrain import config
from jaxtrain.errors import UserError
from jaxtrain.kernels import (
    IMPLS,
    BlockSizes,
    attention,
    chunked_causal_attention,
    flash_attention,
    resolve_impl,
    xla_attention,
)
from jaxtrain.kernels.flash_mask import MaskSpec


def inputs(seed, b=2, length=256, n=4, kv=2, h=16, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (b, length, n, h), dtype)
    k = jax.random.normal(keys[1], (b, length, kv, h), dtype)
    v = jax.random.normal(keys[2], (b, length, kv, h), dtype)
    return q, k, v


def segments(b, length, seed):
    """Several documents per row: ids increase at random boundaries."""
    rng = np.random.default_rng(seed)
    starts = np.zeros((b, length), np.int32)
    for row in range(b):
        starts[row, rng.choice(np.arange(1, length), size=3, replace=False)] = 1
    return jnp.asarray(np.cumsum(starts, axis=1))


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("with_segments", [False, True])
def test_chunked_matches_reference(kv, with_segments):
    q, k, v = inputs(kv, kv=kv)
    seg = segments(2, 256, kv) if with_segments else None

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, segment_ids=seg)))

    ref = jax.jit(jax.value_and_grad(loss(xla_attention), argnums=(0, 1, 2)))(q, k, v)
    out = jax.jit(jax.value_and_grad(loss(chunked_causal_attention), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_segments_block_cross_document_attention():
    q, k, v = inputs(0, length=256)
    seg = jnp.concatenate([jnp.zeros((2, 128), jnp.int32), jnp.ones((2, 128), jnp.int32)], 1)
    full = chunked_causal_attention(q, k, v, segment_ids=seg)
    alone = xla_attention(q[:, 128:], k[:, 128:], v[:, 128:])
    np.testing.assert_allclose(full[:, 128:], alone, rtol=1e-5, atol=1e-5)


def test_auto_dispatch():
    q, k, v = inputs(1, length=256)
    np.testing.assert_allclose(attention(q, k, v), xla_attention(q, k, v), rtol=1e-5, atol=1e-5)
    short = [x[:, :100] for x in (q, k, v)]  # not a multiple of the block: the reference
    np.testing.assert_array_equal(attention(*short), xla_attention(*short))
    with pytest.raises(ValueError):
        attention(*short, impl="chunked")


# --- sliding window and the dispatcher ----------------------------------------------


def dense_reference(q, k, v, *, causal, window=None, segment_ids=None, bias=None):
    """The definition, in float64 numpy: query i (at key position i + S - L) sees key j
    when j <= i (causal), |i - j| < window (j <= i's side only when causal) and the
    segments match; it then takes the softmax-weighted mean of the values it sees, the
    scores being q.k / sqrt(H) plus ``bias[b, n, i, j]`` when given."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, q_len, n, h = q.shape
    k_len, kv = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for bi, i, ni in np.ndindex(b, q_len, n):
        pos = i + k_len - q_len
        seen = [
            j
            for j in range(k_len)
            if (not causal or j <= pos)
            and (window is None or abs(pos - j) < window)
            and (segment_ids is None or segment_ids[bi, i] == segment_ids[bi, j])
        ]
        kh = ni // (n // kv)
        scores = k[bi, seen, kh] @ q[bi, i, ni] / np.sqrt(h)
        if bias is not None:
            scores = scores + np.asarray(bias, np.float64)[bi, ni, i, seen]
        p = np.exp(scores - scores.max())
        out[bi, i, ni] = (p / p.sum()) @ v[bi, seen, kh]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_reference_window_and_segments_follow_the_definition(causal):
    q, k, v = inputs(11, b=1, length=12, n=2, kv=1, h=4)
    seg = jnp.asarray([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    got = xla_attention(q, k, v, causal=causal, window=3, segment_ids=seg)
    want = dense_reference(q, k, v, causal=causal, window=3, segment_ids=np.asarray(seg))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bias_is_added_to_the_scores_on_the_reference_path_only():
    q, k, v = inputs(15, b=2, length=10, n=4, kv=2, h=4)
    bias = jax.random.normal(jax.random.PRNGKey(16), (2, 4, 10, 10))
    want = dense_reference(q, k, v, causal=True, bias=np.asarray(bias))
    for impl in ("auto", "xla"):  # a biased call always takes the reference
        got = attention(q, k, v, causal=True, bias=bias, impl=impl)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert resolve_impl("auto", causal=True, q_len=256, k_len=256, biased=True) == "xla"
    for impl in ("pallas", "cudnn", "chunked"):
        with pytest.raises(UserError, match=r"^model.attention: .* no additive score bias"):
            attention(q, k, v, causal=True, bias=bias, impl=impl)
    with pytest.raises(UserError, match=r"^model.attention: 'pallas' takes no additive"):
        config.load(
            None, ["model.family=t5", "train.objective=span_corruption", "model.attention=pallas"]
        )


def test_chunked_applies_the_window():
    q, k, v = inputs(12, b=1, length=256, n=2, kv=1)
    seg = segments(1, 256, 12)
    got = jax.jit(chunked_causal_attention, static_argnames="window")(
        q, k, v, segment_ids=seg, window=40
    )
    want = jax.jit(xla_attention, static_argnames="window")(q, k, v, segment_ids=seg, window=40)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_resolve_impl_on_cpu():
    assert resolve_impl("auto", causal=True, q_len=256, k_len=256) == "chunked"
    assert resolve_impl("auto", causal=True, q_len=100, k_len=100) == "xla"
    assert resolve_impl("auto", causal=False, q_len=256, k_len=256) == "xla"
    assert resolve_impl("pallas", causal=True, q_len=7, k_len=7) == "pallas"
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        resolve_impl("flash", causal=True, q_len=8, k_len=8)


def test_auto_on_gpu_takes_cudnn_only_where_it_computes_the_call_whole(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    call = dict(causal=True, q_len=256, k_len=256, dtype=jnp.bfloat16, head_dim=128)
    assert resolve_impl("auto", **call) == "cudnn"
    assert resolve_impl("auto", **{**call, "dtype": jnp.float16}) == "cudnn"
    assert resolve_impl("auto", **call, biased=True) == "xla"
    for change in (
        {"dtype": jnp.float32},  # cuDNN takes half precision only
        {"dtype": None},  # the context-parallel ring: its blocks take the Pallas kernel
        {"head_dim": 256},
        {"head_dim": 100},
        {"k_len": 128},  # cuDNN's causal mask is aligned at the first query
    ):
        assert resolve_impl("auto", **{**call, **change}) == "pallas", change
    assert resolve_impl("auto", **call, segments=True) == "pallas"  # dense mask otherwise
    assert resolve_impl("auto", **call, window=64) == "pallas"
    assert resolve_impl("auto", **{**call, "causal": False, "k_len": 128}) == "cudnn"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_impl("auto", **call) == "pallas"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_matches_reference_on_gpu(causal):
    q, k, v = (x.astype(jnp.bfloat16) for x in inputs(15, b=2, length=256))
    cotangent = jax.random.normal(jax.random.PRNGKey(16), q.shape, jnp.float32)

    def value_and_grads(impl, q, k, v):
        out, pullback = jax.vjp(lambda *a: attention(*a, causal=causal, impl=impl), q, k, v)
        return out, *pullback(cotangent.astype(out.dtype))

    step = jax.jit(value_and_grads, static_argnums=0)
    assert "cudnn" in step.lower("auto", q, k, v).compile().as_text()
    got = step("auto", q, k, v)
    want = value_and_grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert relative_error(a, b) < 2e-2, (name, relative_error(a, b))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the refusal off GPU")
def test_cudnn_is_refused_off_gpu():
    q, k, v = inputs(13, b=1, length=16)
    with pytest.raises(
        UserError, match="^model.attention: 'cudnn' needs a GPU, but JAX runs on cpu"
    ):
        attention(q, k, v, impl="cudnn")


def test_dispatcher_reaches_the_pallas_kernel():
    q, k, v = inputs(14, b=1, length=100)  # default blocks, one padded block
    seg = segments(1, 100, 14)
    got = jax.jit(attention, static_argnames=("window", "impl"))(
        q, k, v, segment_ids=seg, window=30, impl="pallas"
    )
    want = xla_attention(q, k, v, segment_ids=seg, window=30)
    assert relative_error(got, want) < 1e-5
    with pytest.raises(ValueError, match="window must be >= 1"):
        attention(q, k, v, window=0, impl="pallas")


def test_config_accepts_the_implementations_and_names_the_key_otherwise():
    assert config.ATTENTION_IMPLS == IMPLS
    for impl in IMPLS:
        assert config.load(None, [f"model.attention={impl}"]).model.attention == impl
    with pytest.raises(UserError) as err:
        config.load(None, ["model.attention=flash"])
    message = str(err.value)
    assert message.startswith("model.attention: must be one of") and "\n" not in message


# --- the Pallas flash-attention kernel (interpret mode on CPU) ------------------------

SMALL_BLOCKS = BlockSizes(q=32, k=16, q_bwd=16, k_bwd=32)  # forward and backward differ


# (causal, heads, kv heads, L, S, segments, window, dtype): GQA ratios 1, 2 and 4,
# lengths that are not multiples of the blocks, L != S, several documents per row.
FLASH_CASES = [
    (True, 4, 4, 40, 40, False, None, "float32"),
    (True, 4, 2, 64, 64, True, None, "float32"),
    (True, 4, 1, 50, 50, True, None, "float32"),
    (False, 4, 2, 48, 48, True, None, "float32"),
    (True, 4, 1, 45, 45, True, 12, "float32"),
    (False, 2, 1, 40, 40, False, 10, "float32"),
    (True, 4, 2, 24, 40, False, None, "float32"),
    (False, 4, 4, 33, 21, False, None, "float32"),
    (True, 4, 2, 40, 40, True, None, "bfloat16"),
    (True, 4, 1, 50, 50, False, 16, "bfloat16"),
]


# The TPU family tiles keys through the grid in blocks of at least 128 (Mosaic's lanes):
# lengths of a few key blocks, forward and backward blocks that differ, run by the
# Pallas TPU interpreter (which fills scratch with NaN, so an unset accumulator shows).
TPU_BLOCKS = BlockSizes(q=32, k=128, q_bwd=64, k_bwd=256)
TPU_CASES = [
    (True, 4, 2, 300, 300, True, None, "float32"),
    (True, 4, 1, 290, 290, True, 70, "float32"),
    (True, 4, 2, 100, 300, False, None, "float32"),
    (False, 4, 4, 260, 260, True, 90, "bfloat16"),
]


def check_flash(case, blocks, platform, batch):
    """Output and gradients of the kernel family ``platform`` (interpreted) equal the
    reference's on fresh inputs."""
    causal, n, kv, q_len, k_len, with_segments, window, dtype = case
    seed = zlib.crc32(repr(case).encode())  # fresh inputs for every case
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, n, 16), dtype)
    k = jax.random.normal(keys[1], (batch, k_len, kv, 16), dtype)
    v = jax.random.normal(keys[2], (batch, k_len, kv, 16), dtype)
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
    seg = segments(batch, q_len, seed) if with_segments else None
    options = dict(causal=causal, window=window)

    def flash(q, k, v, seg):
        return flash_attention(
            q, k, v, segment_ids=seg, block_sizes=blocks, platform=platform, **options
        )

    def reference(q, k, v, seg):  # float32 on the same (possibly bfloat16-rounded) inputs
        return xla_attention(q, k, v, segment_ids=seg, **options)

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grads(fn, q, k, v, seg, cotangent):
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
        return out, pullback(cotangent.astype(out.dtype))

    out, grads = value_and_grads(flash, q, k, v, seg, cotangent)
    ref, ref_grads = value_and_grads(
        reference, *(x.astype(jnp.float32) for x in (q, k, v)), seg, cotangent
    )
    assert out.dtype == q.dtype and all(g.dtype == q.dtype for g in grads)
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    pairs = zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), strict=True)
    for name, got, want in pairs:
        assert relative_error(got, want) < tolerance, (name, relative_error(got, want))


@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_matches_reference(case):
    check_flash(case, SMALL_BLOCKS, "gpu", batch=2)


@pytest.mark.parametrize("case", TPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_tpu_kernels_match_reference(case):
    check_flash(case, TPU_BLOCKS, "tpu", batch=1)


def test_flash_never_builds_the_score_matrix():
    """No array in the traced forward and backward, kernels included, is L x S."""
    q, k, v = inputs(15, b=1, length=256, n=2, kv=1)

    def loss(q, k, v):
        return jnp.sum(flash_attention(q, k, v, block_sizes=SMALL_BLOCKS))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    shapes = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.update(tuple(getattr(x.aval, "shape", ())) for x in eqn.outvars)
            for param in eqn.params.values():
                for sub in param if isinstance(param, list | tuple) else [param]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jaxpr.jaxpr)
    assert (32, 16) in shapes  # the walk did reach the kernels' [block_q, block_k] scores
    assert not [s for s in shapes if len(s) >= 2 and s[-2:] == (256, 256)], shapes


@pytest.mark.parametrize(
    "causal, window, q_len, k_len",
    [(True, None, 80, 80), (True, 20, 80, 70), (False, 20, 80, 80), (True, 9, 80, 101)],
)
def test_mask_block_ranges_are_tight(causal, window, q_len, k_len):
    """The blocks a kernel visits are exactly those holding a visible (query, key) pair."""
    bq, bk = 16, 32
    k_pad = -(-k_len // bk) * bk
    offset = k_len - q_len
    kv_len = k_len if k_pad > k_len else None
    spec = MaskSpec(causal=causal, window=window, offset=offset, kv_len=kv_len, segments=False)
    q_pos = jnp.arange(q_len)[:, None] + offset
    keep = spec.keep(q_pos, jnp.arange(k_pad)[None, :], None, None)
    keep = np.broadcast_to(np.asarray(keep), (q_len, k_pad))

    def assert_tight(seen, lo, hi, what):
        if len(seen):
            assert (int(lo), int(hi)) == (seen.min(), seen.max() + 1), what
        else:
            assert int(lo) >= int(hi), what

    for i in range(q_len // bq):
        seen = np.flatnonzero(keep[i * bq : (i + 1) * bq].any(0).reshape(-1, bk).any(1))
        lo, hi = spec.key_blocks(jnp.int32(i * bq), bq, bk, k_pad // bk)
        assert_tight(seen, lo, hi, ("key blocks of query block", i))
    for j in range(k_pad // bk):
        if kv_len is not None and j * bk >= kv_len:
            continue  # a key block wholly of padding is visited, and masked
        seen = np.flatnonzero(keep[:, j * bk : (j + 1) * bk].any(1).reshape(-1, bq).any(1))
        lo, hi = spec.query_blocks(jnp.int32(j * bk), bk, bq, q_len // bq)
        assert_tight(seen, lo, hi, ("query blocks of key block", j))

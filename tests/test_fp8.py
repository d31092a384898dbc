"""FP8 matmuls with delayed scaling (``model.fp8``): the dot and its gradients within
float8's quantization bound of the float32 dot, scales that follow the amax history,
histories the step records, and a sharded FP8 step equal to the one-device FP8 step."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.bounds import F32, FP8_GRADIENT, relative_error
from helpers.hf import FIXTURES
from helpers.runs import run, update_errors
from tiny import TINY

from jaxtrain import config
from jaxtrain.errors import UserError
from jaxtrain.models.fp8 import E4M3, E5M2, fp8_einsum, is_history_path, scale
from jaxtrain.models.hf import config_from_hf, from_pretrained, save_pretrained
from jaxtrain.plan.report import make_plan
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program, fp8_history

SPEC = "BLD,DF->BLF"


def operands(seed=0, spread=2.0):
    """x [2, 8, 32], w [32, 16] and an output gradient g, over several orders of
    magnitude (``spread`` decades) so the subnormal range is exercised too."""
    keys = jax.random.split(jax.random.key(seed), 6)

    def draw(k1, k2, shape, size):
        magnitude = 10.0 ** jax.random.uniform(k2, shape, minval=-spread, maxval=0.0)
        return jax.random.normal(k1, shape) * magnitude * size

    x = draw(keys[0], keys[1], (2, 8, 32), 3.0)
    w = draw(keys[2], keys[3], (32, 16), 0.05)
    g = draw(keys[4], keys[5], (2, 8, 16), 1e-3)
    return x, w, g


def unit_roundoff(fmt):
    """Relative rounding of a normal float8 value: 2**-(mantissa bits + 1)."""
    return 2.0 ** -(jnp.finfo(fmt).nmant + 1)


def half_spacing(fmt, factor):
    """The largest absolute rounding of a subnormal, in the unscaled units."""
    return float(jnp.finfo(fmt).smallest_subnormal) / 2 / factor


def product_bound(a, b, spec, ua, ub, da, db):
    """|sum a b - sum â b̂| for â = a(1 ± ua) ± da and b̂ likewise, summed per output."""
    a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    relative = np.einsum(spec, a, b) * ((1 + ua) * (1 + ub) - 1)
    absolute = np.einsum(spec, a, np.full_like(b, db)) * (1 + ua)
    absolute += np.einsum(spec, np.full_like(a, da), b) * (1 + ub)
    absolute += np.einsum(spec, np.full_like(a, da), np.full_like(b, db))
    return relative + absolute


@pytest.mark.parametrize("history", ["empty", "matching", "older_larger"])
def test_dot_and_gradients_within_the_quantization_bound(history):
    """Forward (e4m3 x and w) and both gradients (e5m2 g against the e4m3 operands)
    stay within what rounding each operand to float8 allows, for the scales an empty
    history (the tensor's own amax), a matching one and a 4x larger one give."""
    x, w, g = operands()
    amaxes = jnp.stack([jnp.max(jnp.abs(t)) for t in (x, w, g)])
    factor = {"empty": 0.0, "matching": 1.0, "older_larger": 4.0}[history]
    hist = jnp.zeros((3, 4)).at[:, 1].set(amaxes * factor)

    out, pullback = jax.vjp(
        lambda x, w: fp8_einsum(SPEC, x, w, hist, jnp.float32, jnp.float32), x, w
    )
    dx, dw = pullback(g)
    sx, sw, sg = (scale(hist[i], amaxes[i], f) for i, f in enumerate((E4M3, E4M3, E5M2)))
    u4, u5 = unit_roundoff(E4M3), unit_roundoff(E5M2)
    d4x, d4w, d5g = half_spacing(E4M3, sx), half_spacing(E4M3, sw), half_spacing(E5M2, sg)

    cases = [
        (out, jnp.einsum(SPEC, x, w), product_bound(x, w, SPEC, u4, u4, d4x, d4w)),
        (dx, jnp.einsum("BLF,DF->BLD", g, w), product_bound(g, w, "BLF,DF->BLD", u5, u4, d5g, d4w)),
        (dw, jnp.einsum("BLD,BLF->DF", x, g), product_bound(x, g, "BLD,BLF->DF", u4, u5, d4x, d5g)),
    ]
    for got, exact, bound in cases:
        error = np.abs(np.asarray(got, np.float64) - np.asarray(exact, np.float64))
        assert np.all(error <= bound * 1.001 + 1e-30), float(np.max(error / bound))
        assert np.max(error) > 0  # float8, not a float32 dot


def test_the_scales_follow_the_history():
    """The scale is float8's max over the history's largest amax (delayed): a history
    far above today's tensor pushes it into float8's subnormals and costs accuracy, one
    below it saturates; an empty history uses the tensor's own amax."""
    x, w, _ = operands(spread=0.5)
    exact = np.asarray(jnp.einsum(SPEC, x, w))
    amax_x, amax_w = float(jnp.max(jnp.abs(x))), float(jnp.max(jnp.abs(w)))

    def error(hist_x):
        hist = jnp.zeros((3, 4)).at[0, 2].set(hist_x).at[1, 0].set(amax_w)
        out = fp8_einsum(SPEC, x, w, hist, jnp.float32, jnp.float32)
        return float(np.max(np.abs(np.asarray(out) - exact)) / np.max(np.abs(exact)))

    assert float(scale(jnp.array([0.0, 2.0, 1.0]), jnp.float32(9.0), E4M3)) == 448.0 / 2.0
    assert float(scale(jnp.zeros(3), jnp.float32(8.0), E4M3)) == 448.0 / 8.0
    assert float(scale(jnp.zeros(3), jnp.float32(0.0), E4M3)) == 1.0
    matching = error(amax_x)
    assert error(0.0) == matching  # an empty history: the tensor's own amax
    assert error(1e6 * amax_x) > 10 * matching  # into the subnormals
    assert error(amax_x / 100) > 10 * matching  # saturated


def test_the_gradient_of_a_history_is_the_amaxes_seen_and_the_step_records_them():
    x, w, g = operands()
    hist = jnp.arange(12.0).reshape(3, 4)
    _, pullback = jax.vjp(lambda h: fp8_einsum(SPEC, x, w, h, jnp.float32, jnp.float32), hist)
    (seen,) = pullback(g)
    want = [float(jnp.max(jnp.abs(t))) for t in (x, w, g)]
    np.testing.assert_allclose(np.asarray(seen[:, 0]), want, rtol=1e-6)
    assert not np.any(np.asarray(seen[:, 1:]))

    mask = {"h": True, "p": False}
    params, old = {"h": hist + 100, "p": jnp.ones(2)}, {"h": hist, "p": jnp.zeros(2)}
    recorded = fp8_history.record(mask, params, old, {"h": seen, "p": jnp.zeros(2)})
    np.testing.assert_allclose(recorded["h"][:, 0], want, rtol=1e-6)
    np.testing.assert_array_equal(recorded["h"][:, 1:], hist[:, :-1])  # shifted, oldest out
    np.testing.assert_array_equal(recorded["p"], params["p"])
    both = fp8_history.combine(mask, {"h": seen, "p": jnp.ones(2)}, {"h": 2 * seen, "p": 1.0})
    np.testing.assert_allclose(both["h"], 2 * seen)  # maximum
    np.testing.assert_allclose(both["p"], 2 * np.ones(2))  # sum


FP8 = ("model.fp8=true", "model.fp8_history=4")


@functools.cache
def one_device_fp8(*extra):
    return run([*FP8, "mesh.fsdp=1", *extra], jax.devices()[:1])


@pytest.mark.parametrize(
    "layout, extra",
    [
        (("mesh.fsdp=8",), ()),
        (
            ("mesh.preset=fsdp_tp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
            ("train.microbatches=2", "model.remat=full"),
        ),
    ],
    ids=["fsdp8", "dp2_fsdp2_tp2_microbatches2_remat"],
)
def test_sharded_fp8_step_equals_one_device(layout, extra):
    """Three FP8 AdamW steps on 8 devices: the same losses and amax histories as one
    device with the same microbatches (the amaxes are global maxima, so every device
    scales the same) and the same updates, at FP8_GRADIENT rather than float32's UPDATE:
    float32 sums in another order can tip a value across a float8 rounding boundary
    (``helpers.bounds``). With one microbatch's gradient counted 1.25 times in the sharded
    run alone, the second layout's losses were 7.6e-5 off and its histories too."""
    result = run([*FP8, *layout, *extra], jax.devices())
    reference = one_device_fp8(*extra)
    np.testing.assert_allclose(result.losses, reference.losses, rtol=F32)
    flat = jax.tree_util.tree_flatten_with_path(result.state.params)[0]
    ref_flat = jax.tree.leaves(reference.state.params)
    for (path, leaf), ref in zip(flat, ref_flat, strict=True):
        if is_history_path(tuple(k.key for k in path)):
            assert relative_error(leaf, ref) <= F32, path
    errors = update_errors(result, reference, FP8_GRADIENT)
    updated = {p: e for p, e in errors.items() if not is_history_path(tuple(p.split("/")))}
    assert all(error <= allowed for error, allowed in updated.values()), updated


def test_the_histories_fill_step_by_step():
    """After three steps each history holds three amaxes, newest first, and nothing
    else; the step's amaxes are positive and finite."""
    state = one_device_fp8().state
    hist = np.asarray(state.params["blocks"]["attn"]["wq_fp8"])  # [layers, 3, 4]
    assert hist.shape == (2, 3, 4)
    assert np.all(np.isfinite(hist[:, :, :3])) and np.all(hist[:, :, :3] > 0)
    assert not np.any(hist[:, :, 3])


def test_fp8_config_errors():
    for overrides, key in [
        (["model.fp8=true", "model.family=bert", "train.objective=mlm"], "model.fp8"),
        (["model.fp8=true", "model.moe.num_experts=4"], "model.fp8"),
        (["model.fp8=true", "model.compute_dtype=float16"], "model.fp8"),
        (["model.fp8_history=0"], "model.fp8_history"),
        (
            [
                "model.fp8=true",
                "train.grad_accumulation=local",
                "train.microbatches=2",
            ],
            "train.grad_accumulation",
        ),
    ]:
        with pytest.raises(UserError, match=f"^{key}: "):
            config.load(None, overrides)


def test_hugging_face_weights_in_and_out_of_an_fp8_model(tmp_path):
    """``init_from`` an HF checkpoint starts every history empty and the weights as the
    checkpoint's; exporting writes the weights only, which read back unchanged."""
    directory = FIXTURES / "llama"
    hf_model = dataclasses.asdict(config_from_hf(directory))
    cfg = config.from_dict(
        {
            "model": hf_model | {"init_from": f"hf:{directory}", "fp8": True},
            "data": {"seq_len": 16},
            "train": {"global_batch": 8},
        }
    )
    program = build_program(cfg, make_mesh(cfg))
    params = program.init_state().params
    flat = dict(jax.tree_util.tree_leaves_with_path(params))
    histories = [v for p, v in flat.items() if is_history_path(tuple(k.key for k in p))]
    assert len(histories) == 7 and not any(np.any(h) for h in histories)
    _, reference = from_pretrained(directory)
    weights = nnx.to_pure_dict(nnx.state(reference))
    for path, want in jax.tree_util.tree_leaves_with_path(weights):
        np.testing.assert_array_equal(flat[path], want)
    save_pretrained(cfg.model, params, tmp_path / "out")
    _, back = from_pretrained(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(back)), weights)


def test_zero3_gathers_float8_weights():
    """The weights are quantized where they lie, split over fsdp, and gathered as float8:
    the compiled step's gathers move about half of what ZeRO-3 gathers at bfloat16 (a
    bfloat16 step moves 0.87 of it here; all but the embedding, head and norms are
    float8 projections)."""
    cfg = config.load(None, [*TINY, "model.compute_dtype=bfloat16", "model.fp8=true"])
    plan = make_plan(build_program(cfg, make_mesh(cfg)))
    gathered, at_bf16 = plan.traffic["all-gather"].program_bytes, plan.ideal.gather
    assert 0.35 * at_bf16 < gathered < 0.6 * at_bf16

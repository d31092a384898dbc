"""Gradients sent across devices in bfloat16 or fp8 (``train.grad_comm_dtype``).

The reduction alone equals the float32 sum within the rounding the casts allow, on every
layout the presets produce; whole steps stay within a small margin of float32
communication; and the compiled step's collectives carry the narrow bytes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.bounds import F32, U_BF16, U_E5M2
from helpers.runs import ACCUMULATING, STEPS, random_batches
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtrain import config
from jaxtrain.errors import UserError
from jaxtrain.plan.report import make_plan
from jaxtrain.sharding import make_mesh
from jaxtrain.sharding.grad_comm import reduce_shards
from jaxtrain.sharding.mesh import MESH_AXES
from jaxtrain.train import build_program

# Unit roundoff of each wire format (round to nearest): 2**-(mantissa bits + 1).
ROUNDOFF = {"bfloat16": U_BF16, "fp8": U_E5M2}


def mesh_of(**sizes):
    grid = np.array(jax.devices()).reshape([sizes.get(a, 1) for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


# (mesh, the parameter's layout, its per-shard gradients' layout, roundings on the way):
# ZeRO-3 beside data parallelism, plain data parallelism, ZeRO-3 with tensor
# parallelism, and a parameter that only tensor parallelism splits.
LAYOUTS = {
    "data2_fsdp4": ({"data": 2, "fsdp": 4}, P("fsdp", None), P(("data", "fsdp"), None, None), 3),
    "data8": ({"data": 8}, P(None, None), P("data", None, None), 2),
    "fsdp4_tp2": ({"fsdp": 4, "tensor": 2}, P("fsdp", "tensor"), P("fsdp", None, "tensor"), 1),
    "dp2_fsdp2_tp2": (
        {"data": 2, "fsdp": 2, "tensor": 2},
        P(None, "tensor"),
        P(("data", "fsdp"), None, "tensor"),
        2,
    ),
}


def per_shard_gradients(mesh_sizes, spec, shape=(64, 24)):
    """[S, *shape] gradients spread over six orders of magnitude, laid out by ``spec``."""
    shards = mesh_sizes.get("data", 1) * mesh_sizes.get("fsdp", 1)
    k1, k2 = jax.random.split(jax.random.key(0))
    values = jax.random.normal(k1, (shards, *shape))
    values = values * 10.0 ** jax.random.uniform(k2, (shards, shape[0], 1), minval=-3, maxval=3)
    return values


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reduction_equals_float32_sum_within_the_casts_rounding(layout, dtype):
    sizes, param_spec, shard_spec, roundings = LAYOUTS[layout]
    mesh = mesh_of(**sizes)
    shards, param = NamedSharding(mesh, shard_spec), NamedSharding(mesh, param_spec)
    grads = jax.device_put(per_shard_gradients(sizes, shard_spec), shards)
    reduce = jax.jit(lambda g: reduce_shards(g, shards, param, dtype), out_shardings=param)
    result = np.asarray(reduce(grads), np.float64)
    exact = np.asarray(grads, np.float64)
    # Each rounding adds at most u times what it rounds, and what it rounds is at most
    # the sum of magnitudes grown by the roundings before it. fp8's subnormals (spacing
    # 2**-16, after scaling the largest value to 57344) add an absolute error of at most
    # half that spacing per rounded value.
    u = ROUNDOFF[dtype]
    magnitude = np.sum(np.abs(exact), axis=0)
    grown = (1 + u) ** roundings
    bound = (grown - 1) * magnitude
    if dtype == "fp8":
        bound += roundings * exact.shape[0] * 2.0**-17 / 57344 * grown * np.max(magnitude)
    error = np.abs(result - np.sum(exact, axis=0))
    assert np.all(error <= bound * 1.0001), float(np.max(error / bound))
    assert np.max(error) > 0  # it did round: the float32 sum is not what came back
    assert reduce(grads).sharding.is_equivalent_to(param, 2)


def test_a_non_finite_gradient_stays_non_finite():
    """An overflow in one shard must reach the step's non-finite check, not vanish in
    the fp8 scale."""
    sizes, param_spec, shard_spec, _ = LAYOUTS["data2_fsdp4"]
    mesh = mesh_of(**sizes)
    shards, param = NamedSharding(mesh, shard_spec), NamedSharding(mesh, param_spec)
    grads = per_shard_gradients(sizes, shard_spec).at[3, 5, 7].set(jnp.inf)
    result = reduce_shards(jax.device_put(grads, shards), shards, param, "fp8")
    assert not np.all(np.isfinite(np.asarray(result)))


LOCAL = (
    "mesh.preset=fsdp",
    "mesh.data=2",
    "mesh.fsdp=4",
    "train.global_batch=16",
    "train.microbatches=2",
    "train.grad_accumulation=local",
)


@functools.cache
def steps(overrides):
    """Per step of 3 AdamW steps (``helpers.runs.STEPS``): the loss, the gradient's norm
    and the learning rate the step's update used."""
    cfg = config.load(None, [*STEPS, *overrides])
    program = build_program(cfg, make_mesh(cfg, jax.devices()))
    state, out = program.init_state(), []
    for batch in random_batches(program, cfg.train.steps):
        state, metrics = program.train_step(state, jax.device_put(batch, program.batch_sharding))
        out.append((float(metrics["loss"]), float(metrics["grad_norm"]), float(metrics["lr"])))
    return np.array(out).T


@pytest.mark.parametrize(
    "layout, dtype",
    [(LOCAL, "fp8"), (LOCAL, "bfloat16"), (("mesh.fsdp=8",), "bfloat16")],
    ids=["local_fp8", "local_bf16", "sharded_bf16"],
)
def test_steps_stay_within_the_casts_rounding_of_float32_communication(layout, dtype):
    """Three steps against float32 communication, held to what the casts can change
    (``r``: at most three roundings of the wire format on the way, as above):

    - each gradient element, and so the gradient's norm, within ``r`` while the
      parameters are still the same (the first update has learning rate 0: warmup);
    - each loss within ``norm * 2 r * sum of the learning rates so far``: the clipped
      gradient (norm <= 1) moved by ``r`` moves LINEAR_ADAM's step by at most ``2 r``,
      and the loss by the gradient's norm times that move, to first order.

    Yet not equal: the narrow dtype was used."""
    losses, norms, rates = steps((*layout, f"train.grad_comm_dtype={dtype}"))
    ref_losses, ref_norms, _ = steps(layout)
    r = (1 + ROUNDOFF[dtype]) ** 3 - 1 + F32
    moved = np.concatenate([[0.0], np.cumsum(rates)[:-1]])  # learning rates before each step
    assert np.all(np.abs(losses - ref_losses) <= ref_norms * 2 * r * moved + F32 * ref_losses)
    same = moved == 0
    assert same.sum() >= 2  # two steps at the initial parameters
    difference = np.abs(norms - ref_norms) / ref_norms
    assert 0 < np.max(difference[same]) <= r, difference


def reduced_bytes(plan):
    """The bytes the step's gradient reductions move (all-to-alls: the narrow reduction)."""
    kinds = ("reduce-scatter", "all-reduce", "all-to-all")
    return sum(plan.traffic[k].program_bytes for k in kinds)


@pytest.fixture(scope="module")
def local_plans():
    plans = {}
    for dtype in ("float32", "bfloat16", "fp8"):
        cfg = config.load(
            None,
            [*ACCUMULATING, "train.grad_accumulation=local", f"train.grad_comm_dtype={dtype}"],
        )
        program = build_program(cfg, make_mesh(cfg))
        plans[dtype] = (program, make_plan(program))
    return plans


def test_compiled_local_reduction_sends_half_and_a_quarter_of_the_bytes(local_plans):
    """The compiled steps' reductions move 1/2 (bfloat16) and 1/4 (fp8) of float32's
    bytes, the all-to-alls carry 16- and 8-bit elements, and plan reports it."""
    f32 = reduced_bytes(local_plans["float32"][1])
    assert reduced_bytes(local_plans["bfloat16"][1]) == pytest.approx(f32 / 2, rel=0.03)
    assert reduced_bytes(local_plans["fp8"][1]) == pytest.approx(f32 / 4, rel=0.06)
    for dtype, wire in (("bfloat16", "u16["), ("fp8", "u8[")):
        program, plan = local_plans[dtype]
        hlo = program.train_step.lower(program.abstract_state, program.abstract_batch())
        text = hlo.compile().as_text()
        exchanges = [line for line in text.splitlines() if " all-to-all(" in line]
        assert exchanges and any(wire in line for line in exchanges)
        assert plan.to_json()["grad_comm_dtype"] == dtype
        assert plan.ideal.reduce_scatter * {"bfloat16": 2, "fp8": 4}[dtype] == (
            local_plans["float32"][1].ideal.reduce_scatter
        )


def test_sharded_bf16_halves_the_weight_matmuls_reductions():
    """Under sharded accumulation the weight matmuls' gradients (all but the embedding
    table and the norms' scales) are reduced in bfloat16."""
    plans = {}
    for dtype in ("float32", "bfloat16"):
        cfg = config.load(None, [*ACCUMULATING, f"train.grad_comm_dtype={dtype}"])
        plans[dtype] = make_plan(build_program(cfg, make_mesh(cfg)))
    f32, bf16 = reduced_bytes(plans["float32"]), reduced_bytes(plans["bfloat16"])
    assert 0.5 * f32 < bf16 < 0.6 * f32


def test_fp8_needs_local_accumulation():
    with pytest.raises(UserError, match="train.grad_comm_dtype: fp8 needs"):
        config.load(None, ["train.grad_comm_dtype=fp8"])
    with pytest.raises(UserError, match="train.grad_comm_dtype: must be one of"):
        config.load(None, ["train.grad_comm_dtype=int8"])

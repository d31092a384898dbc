"""Mixture of experts: the dropless layer against a dense loop over experts, the
router's statistics, the capacity rule, and whole training steps on several layouts.

The reference picks each token's experts by ranking the probabilities itself (ties to
the lower index, as ``lax.top_k`` does) and runs every expert on every token, weighting
by zero where it was not picked: no sorting, no grouped matmul.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.runs import STEPS, assert_same_run, one_device, run, specs
from rich.console import Console
from tiny import TINY

from jaxtrain import config
from jaxtrain.config import MoEConfig
from jaxtrain.errors import UserError
from jaxtrain.metrics import active_params
from jaxtrain.models.layers import no_shard
from jaxtrain.models.moe import MoE, capacity, expert_ffn, route
from jaxtrain.plan import state_plan
from jaxtrain.plan.render import print_traffic
from jaxtrain.plan.report import make_plan
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program
from jaxtrain.train.loop import train

D, F = 16, 24
MOE = ("model.moe.num_experts=8", "model.moe.experts_per_token=2", "model.moe.expert_mlp_dim=32")


def layer(experts=4, k=2, renormalize=True, seed=0, **kw):
    cfg = MoEConfig(
        num_experts=experts, experts_per_token=k, expert_mlp_dim=F, renormalize=renormalize, **kw
    )
    return MoE(
        D,
        cfg,
        out_std=0.02,
        param_dtype=jnp.float32,
        compute_dtype=jnp.float32,
        shard=no_shard,
        rngs=nnx.Rngs(seed),
    )


def dense_reference(x, router, w_gate, w_up, w_down, k, renormalize):
    """Every expert on every token, weighted by the router (zero where not picked)."""
    logits = x @ router  # [T, E]
    probs = jax.nn.softmax(logits, axis=-1)
    e = probs.shape[-1]
    index = jnp.arange(e)
    # rank of expert e for a token: how many beat it (higher, or equal and lower index)
    beats = (probs[:, None, :] > probs[:, :, None]) | (
        (probs[:, None, :] == probs[:, :, None]) & (index[None, :] < index[:, None])[None]
    )
    picked = jnp.sum(beats, axis=-1) < k  # [T, E]
    weights = jnp.where(picked, probs, 0.0)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    y = jnp.zeros_like(x)
    for j in range(e):
        h = jax.nn.silu(x @ w_gate[j]) * (x @ w_up[j])
        y = y + weights[:, j : j + 1] * (h @ w_down[j])
    return y


def params_of(moe):
    return (moe.router[...], moe.w_gate[...], moe.w_up[...], moe.w_down[...])


def ours(x, router, w_gate, w_up, w_down, k, renormalize):
    logits = x @ router
    weights, experts, _ = route(logits, k, renormalize)
    limit = capacity(x.shape[0], k, router.shape[1], 0.0)
    return expert_ffn(x, experts, weights, w_gate, w_up, w_down, jnp.float32, limit)[0]


@pytest.mark.parametrize(
    ("experts", "k", "renormalize", "tokens", "tied"),
    [
        (4, 2, True, 40, False),
        (8, 2, False, 40, False),
        (8, 1, True, 3, False),  # at most 3 of 8 experts get a token
        (4, 2, True, 12, True),  # every router score tied: experts 0 and 1 take all
    ],
    ids=["e4k2", "e8k2-no-renorm", "empty-experts", "ties"],
)
def test_layer_equals_a_dense_loop_over_experts(experts, k, renormalize, tokens, tied):
    moe = layer(experts, k, renormalize)
    x = jax.random.normal(jax.random.key(1), (tokens, D))
    router, w_gate, w_up, w_down = params_of(moe)
    if tied:
        router = jnp.zeros_like(router)
    args = (x, router, w_gate, w_up, w_down)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(*a, k, renormalize)))

    forward = [jax.jit(fn, static_argnums=(5, 6)) for fn in (ours, dense_reference)]
    np.testing.assert_allclose(
        forward[0](*args, k, renormalize),
        forward[1](*args, k, renormalize),
        rtol=1e-5,
        atol=1e-6,
    )
    got = jax.jit(jax.grad(loss(ours), argnums=range(5)))(*args)
    want = jax.jit(jax.grad(loss(dense_reference), argnums=range(5)))(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    if tokens < experts:  # experts nobody picked get exactly zero gradient
        picked = np.unique(np.asarray(route(x @ router, k, renormalize)[1]))
        idle = np.setdiff1d(np.arange(experts), picked)
        assert len(idle) >= experts - tokens
        assert not np.any(np.asarray(got[2])[idle])


def test_the_module_reports_its_router_statistics():
    """balance = E x sum_e f_e P_e (HF Mixtral's form), z = mean logsumexp^2, load counts
    each expert's assignments; the module's output is the function's."""
    moe = layer(4, 2)
    x = jax.random.normal(jax.random.key(2), (3, 10, D))
    y, stats = moe(x)
    flat = x.reshape(-1, D)
    router = np.asarray(moe.router[...], np.float64)
    logits = np.asarray(flat, np.float64) @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
    counts = np.bincount(top.ravel(), minlength=4)
    np.testing.assert_allclose(stats["load"], counts)
    np.testing.assert_allclose(stats["balance"], 4 * np.sum(counts / 30 * probs.mean(0)), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(stats["z"], np.mean(lse**2), rtol=1e-5)
    assert float(stats["dropped"]) == 0
    np.testing.assert_allclose(
        y.reshape(-1, D), ours(flat, *params_of(moe), 2, True), rtol=1e-6, atol=1e-7
    )


def test_capacity_drops_the_latest_tokens_of_a_full_expert():
    """GShard's rule: each expert keeps its first ``capacity`` assignments in token order;
    the dropped ones contribute nothing and are counted."""
    moe = layer(4, 1, capacity_factor=1.0)
    x = jax.random.normal(jax.random.key(3), (1, 12, D))
    router = moe.router[...]
    _, experts, _ = route(x.reshape(-1, D) @ router, 1, True)
    limit = capacity(12, 1, 4, 1.0)
    assert limit == 3
    seen = {}
    expect = []
    for e in np.asarray(experts).ravel():
        seen[e] = seen.get(e, 0) + 1
        expect.append(seen[e] <= limit)
    y, stats = moe(x)
    _, kept = expert_ffn(
        x.reshape(-1, D), experts, jnp.ones((12, 1)), *params_of(moe)[1:], jnp.float32, limit
    )
    np.testing.assert_array_equal(np.asarray(kept).ravel(), expect)
    assert float(stats["dropped"]) == 12 - sum(expect) > 0
    dropped_rows = ~np.asarray(expect)
    assert not np.any(np.asarray(y).reshape(12, D)[dropped_rows])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.moe.experts_per_token=9", "model.moe.experts_per_token"),
        ("model.moe.capacity_factor=-1", "model.moe.capacity_factor"),
        ("model.family=gpt2", "model.moe.num_experts"),
        ("train.grad_accumulation=local", "train.grad_accumulation"),
    ],
)
def test_moe_config_mistakes_are_one_line(override, key):
    with pytest.raises(UserError, match=f"^{key}: "):
        config.load(None, [*TINY, *MOE, override, "model.n_kv_heads=4", "train.microbatches=2"])


def test_active_parameters_count_k_of_e_experts():
    cfg = config.load(None, [*TINY, *MOE]).model
    dense = config.load(None, [*TINY, "model.mlp_dim=32"]).model
    per_expert = 3 * cfg.d_model * 32 * cfg.n_layers
    assert active_params(cfg, 10**6) == 10**6 - 6 * per_expert
    assert active_params(dense, 1000) == 1000


# Expert parallelism with each other axis; the experts' MLP width split by tensor.
LAYOUTS = {
    "fsdp4_microbatches2": ("mesh.fsdp=4", "train.microbatches=2"),
    "expert8": ("mesh.expert=8", "mesh.fsdp=1"),
    "expert4_fsdp2": ("mesh.expert=4", "mesh.fsdp=2"),
    "expert2_tp2_dp2": (
        "mesh.preset=fsdp_tp",
        "mesh.expert=2",
        "mesh.tensor=2",
        "mesh.data=2",
        "mesh.fsdp=1",
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_steps_match_one_device(layout):
    """Routing runs per device and its statistics are summed over the devices: losses
    (with the auxiliary losses in the gradient) and updates equal one device's, also
    when microbatches accumulate. With one microbatch's gradient counted 1.25 times in
    the sharded run alone, fsdp4_microbatches2's losses were 3.2e-5 off and its updates
    0.13 of their scale."""
    overrides = LAYOUTS[layout]
    accumulate = tuple(o for o in overrides if o.startswith("train.microbatches"))
    devices = jax.devices()[: 4 if "mesh.fsdp=4" in overrides else 8]
    assert_same_run(run([*MOE, *overrides], devices), one_device((*MOE, *accumulate)))


def test_expert_parallel_step_exchanges_tokens_all_to_all():
    """With mesh.expert=8 each device holds one expert of each layer, and the compiled
    step moves tokens to their experts and back by all-to-all, not by gathering the
    experts' weights."""
    cfg = config.load(None, [*STEPS, *MOE, "mesh.expert=8", "mesh.fsdp=1"])
    program = build_program(cfg, make_mesh(cfg))
    for name in ("w_gate", "w_up", "w_down"):
        (spec,) = specs(program.abstract_state.params, f"mlp/{name}")
        assert spec[1] == "expert", (name, spec)
    hlo = program.compile()[0].as_text()
    # Token rows [1 device, slots, D=64] go out and come back (forward and backward).
    assert len(re.findall(r"= \(f32\[1,\d+,64\][^\n]* all-to-all\(", hlo)) >= 4
    # No expert weight [E=8, D, F] (or its per-layer slice [1, 8, ...]) is gathered, as
    # fsdp=8 would gather it.
    assert not re.findall(r"= f32\[(1,)?8,(64,32|32,64)\]\S* all-gather\(", hlo)


def test_plan_shows_experts_per_device_and_all_to_all_bytes():
    """`jaxtrain plan`'s numbers for expert=4 x fsdp=2: each device holds an eighth of
    the experts' weights (a quarter of the experts, half their width), and the step's
    all-to-all traffic is counted: the dispatch buffers [4, slots, D] out and back, in
    the forward and the backward pass, per layer."""
    cfg = config.load(None, [*STEPS, *MOE, "mesh.expert=4", "mesh.fsdp=2"])
    program = build_program(cfg, make_mesh(cfg))
    params, _ = state_plan(program)
    (row,) = [r for r in params if r.path.endswith("mlp/w_gate")]
    assert row.bytes_per_device * 8 == row.bytes_total
    plan = make_plan(program)
    tokens = cfg.train.global_batch * cfg.data.seq_len // 8  # per device
    slots = tokens * cfg.model.moe.experts_per_token
    buffer = 4 * slots * cfg.model.d_model * 4  # f32
    # Per layer: token rows out and back, forward and backward (and their expert ids).
    assert plan.traffic["all-to-all"].bytes >= 4 * cfg.model.n_layers * buffer
    console = Console(record=True, width=200)
    print_traffic(plan, console)
    assert "XLA:CPU has no grouped matmul" in console.export_text()


def train_moe(tmp_path, balance_weight):
    cfg = config.load(
        None,
        [
            *TINY,
            *MOE,
            "model.vocab_size=320",
            "train.global_batch=32",
            "train.steps=40",
            "train.log_every=5",
            "optim.lr=3e-3",
            f"model.moe.balance_weight={balance_weight}",
            f"run.dir={tmp_path / str(balance_weight)}",
        ],
    )
    train(cfg, Console(quiet=True))
    lines = (tmp_path / str(balance_weight) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_moe_training_learns_and_the_balancing_loss_keeps_experts_loaded(tmp_path):
    """A tiny MoE model (8 experts, top-2) on the built-in corpus: the loss falls, and with
    the balancing loss (weight 0.05) that loss stays within 10% of its perfectly even
    value, k = 2, at every logged step, and no expert takes 3 even shares. (Without it,
    balance_weight 0, the router collapses onto a few experts: the same loss reached 4.36
    by step 40 and the busiest expert 4 even shares, all of a layer's assignments on 2
    of its 8 experts.)"""
    balanced = train_moe(tmp_path, 0.05)
    assert balanced[-1]["loss"] < balanced[0]["loss"] - 1.5
    assert all(r["moe_balance_loss"] < 2.2 for r in balanced), balanced
    assert balanced[-1]["moe_load_max"] < 3
    assert all(r["moe_dropped"] == 0 for r in balanced)

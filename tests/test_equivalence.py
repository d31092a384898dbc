"""The core guarantee: every mesh layout computes the same numbers as one device.

Three AdamW steps of a tiny model (2 layers, width 64) on each layout must give the
same losses and final parameters as one device, and the state must really be laid out
as the preset says; for LLaMA, and for GPT-2, BERT (masked LM) and T5 (span corruption).
"""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tiny import TINY

from jaxtrain import config
from jaxtrain.sharding import make_mesh, path_str
from jaxtrain.train import build_program

STEPS = (*TINY, "train.steps=3", "optim.warmup_steps=1", "optim.lr=1e-3")
# The other families, each with its own objective (and so its own batch layout).
FAMILIES = {
    "gpt2": ("model.family=gpt2", "model.n_kv_heads=4", "model.tie_embeddings=true"),
    "bert": ("model.family=bert", "train.objective=mlm"),
    "t5": ("model.family=t5", "train.objective=span_corruption"),
}


def random_batches(program, n):
    """``n`` batches of random tokens in the program's batch layout; an MLM batch counts
    about half of its tokens (``weights``)."""
    rng = np.random.default_rng(0)
    vocab = program.config.model.vocab_size
    out = []
    for _ in range(n):
        batch = {}
        for key, spec in program.abstract_batch().items():
            if key == "weights":
                batch[key] = (rng.random(spec.shape) < 0.5).astype(np.float32)
            else:
                batch[key] = rng.integers(0, vocab, size=spec.shape, dtype=np.int32)
        out.append(batch)
    return out


def run(overrides, devices):
    cfg = config.load(None, [*STEPS, *overrides])
    program = build_program(cfg, make_mesh(cfg, devices))
    state = program.init_state()
    losses = []
    for batch in random_batches(program, cfg.train.steps):
        state, metrics = program.train_step(state, jax.device_put(batch, program.batch_sharding))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@functools.cache
def one_device(extra=()):
    return run(["mesh.fsdp=1", *extra], jax.devices()[:1])


def relative_error(a, b):
    """max |a - b| / max |b|: float32 rounding differs between layouts by reduction order,
    so near-zero elements are judged against the scale of their tensor."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def assert_same_run(result, reference):
    (losses, state), (ref_losses, ref_state) = result, reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    params, ref_params = without_key_bias(state.params), without_key_bias(ref_state.params)
    errors = jax.tree.map(relative_error, params, ref_params)
    assert max(jax.tree.leaves(errors)) <= 1e-5, errors


def without_key_bias(params):
    """``params`` less the attention key bias (GPT-2, BERT), checked to have stayed within
    Adam's reach of its zero init. Softmax ignores a shift shared by all keys, and ``q . bk``
    is one, so its exact gradient is zero: what it gets is rounding noise, which differs by
    layout and which Adam scales up to steps of the learning rate."""
    flat = {path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    bias = [leaf for path, leaf in flat.items() if path.endswith("attn/bk")]
    steps, lr = 3, 1e-3  # STEPS
    assert all(np.max(np.abs(np.asarray(b))) <= steps * lr for b in bias)
    return {path: leaf for path, leaf in flat.items() if not path.endswith("attn/bk")}


def specs(tree, suffix):
    """PartitionSpecs of the leaves whose path ends with ``suffix`` (e.g. 'mlp/w_gate')."""
    found = [
        leaf.sharding.spec
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if path_str(path).endswith(suffix)
    ]
    assert found, suffix
    return found


# layout -> (overrides, {path suffix: expected PartitionSpec} for params, and for mu/nu)
LAYOUTS = {
    "dp8": (
        ["mesh.preset=dp", "mesh.data=8", "mesh.fsdp=1"],
        {"embed": P(None, None), "mlp/w_gate": P(None, None, None)},
        {"mlp/w_gate": P(None, None, None)},
    ),
    "fsdp8": (
        ["mesh.preset=fsdp", "mesh.fsdp=8"],
        {
            "embed": P(None, "fsdp"),
            "mlp/w_gate": P(None, "fsdp", None),
            "attn/wo": P(None, None, None, "fsdp"),
        },
        {"mlp/w_gate": P(None, "fsdp", None)},
    ),
    "fsdp4_tp2": (
        ["mesh.preset=fsdp_tp", "mesh.fsdp=4", "mesh.tensor=2"],
        {
            "embed": P("tensor", "fsdp"),
            "mlp/w_gate": P(None, "fsdp", "tensor"),
            "attn/wk": P(None, "fsdp", "tensor", None),
            "lm_head": P("fsdp", "tensor"),
        },
        {"mlp/w_down": P(None, "tensor", "fsdp")},
    ),
    "dp2_fsdp2_tp2": (
        ["mesh.preset=fsdp_tp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
        {"embed": P("tensor", "fsdp"), "attn/wq": P(None, "fsdp", "tensor", None)},
        {"attn/wq": P(None, "fsdp", "tensor", None)},
    ),
    "zero1_dp8": (
        ["mesh.preset=zero1", "mesh.data=8", "mesh.fsdp=1"],
        {"embed": P(None, None), "mlp/w_gate": P(None, None, None)},
        {"mlp/w_gate": P(None, "data", None), "embed": P(None, "data")},
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_device(layout):
    overrides, param_specs, opt_specs = LAYOUTS[layout]
    result = run(overrides, jax.devices())
    assert_same_run(result, one_device())
    state = result[1]
    for suffix, spec in param_specs.items():
        assert specs(state.params, suffix) == [spec], (layout, suffix)
    for suffix, spec in opt_specs.items():
        found = specs(state.opt_state, suffix)  # mu and nu
        assert found == [spec, spec], (layout, suffix, found)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "zero1_dp8"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_other_families_match_one_device(family, layout):
    """GPT-2, BERT and T5 on the LLaMA layouts: same losses and parameters as one device,
    and the embedding laid out (and its Adam moments) as the preset says."""
    overrides, param_specs, _ = LAYOUTS[layout]
    extra = FAMILIES[family]
    result = run([*overrides, *extra], jax.devices())
    assert_same_run(result, one_device(extra))
    state = result[1]
    assert state.params["embed"].sharding.spec == param_specs["embed"]
    moments = [*specs(state.opt_state, "mu/embed"), *specs(state.opt_state, "nu/embed")]
    assert moments == [param_specs["embed"]] * 2, moments


def test_dropout_is_layout_independent():
    """Per-step dropout keys come from fold_in(seed, step) and are sharding-invariant."""
    extra = ("model.dropout=0.1",)
    result = run(["mesh.preset=fsdp_tp", "mesh.fsdp=4", "mesh.tensor=2", *extra], jax.devices())
    reference = one_device(extra)
    assert_same_run(result, reference)
    assert not np.allclose(reference[0], one_device()[0])  # dropout really was on


def test_gradient_accumulation_matches_one_big_batch():
    """4 microbatches of 2 rows == one batch of 8 rows (on a 2-way fsdp mesh)."""
    devices = jax.devices()[:2]
    accumulated = run(["mesh.fsdp=2", "train.microbatches=4"], devices)
    whole = run(["mesh.fsdp=2", "train.microbatches=1"], devices)
    assert_same_run(accumulated, whole)


LOCAL = ("train.microbatches=2", "train.grad_accumulation=local")


@pytest.mark.parametrize(
    "layout",
    [
        ("mesh.preset=dp", "mesh.data=4", "mesh.fsdp=1"),
        ("mesh.preset=fsdp_tp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
    ],
    ids=["dp4", "dp2_fsdp2_tp2"],
)
def test_local_gradient_accumulation_matches_one_device(layout):
    """Each batch shard keeps its own gradient sum over 2 microbatches, reduced once: the
    same run as one device taking the batch whole."""
    devices = jax.devices()[: 4 if "mesh.data=4" in layout else 8]
    assert_same_run(run([*layout, *LOCAL], devices), one_device())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "t5"])
def test_local_gradient_accumulation_other_families(family):
    """The masked-LM weights and T5's decoder inputs split per shard like the tokens."""
    layout = ("mesh.preset=fsdp", "mesh.data=2", "mesh.fsdp=2")
    extra = FAMILIES[family]
    result = run([*layout, *LOCAL, *extra], jax.devices()[:4])
    assert_same_run(result, one_device(extra))


def test_chunked_attention_train_step_matches_reference():
    """The block-skipping attention path gives the reference's training run, sharded."""
    layout = ["mesh.preset=fsdp_tp", "mesh.fsdp=4", "mesh.tensor=2", "data.seq_len=256"]
    chunked = run([*layout, "model.attention=chunked"], jax.devices())
    reference = run([*layout, "model.attention=xla"], jax.devices())
    assert_same_run(chunked, reference)

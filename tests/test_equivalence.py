"""The core guarantee: every mesh layout computes the same numbers as one device.

Three AdamW steps of a tiny model (2 layers, width 64) on each layout must give the
same losses and parameter updates as one device (``helpers.runs.assert_same_run``: losses
at F32, updates at UPDATE, bounds derived in ``helpers.bounds``), and the state must
really be laid out as the preset says; for LLaMA, and for GPT-2, BERT (masked LM) and T5
(span corruption).

The comparison catches real faults, tried by breaking the sharded run alone: with local
accumulation's sum over the data shards dropped (one shard's gradient standing for all),
dp4's updates were 0.91 of their scale off and its losses 2.7e-4; with one microbatch's
gradient counted 1.25 times, the accumulated run's updates were 0.12 off.
"""

import jax
import numpy as np
import pytest
from helpers.runs import assert_same_run, one_device, run, specs
from jax.sharding import PartitionSpec as P

# The other families, each with its own objective (and so its own batch layout).
FAMILIES = {
    "gpt2": ("model.family=gpt2", "model.n_kv_heads=4", "model.tie_embeddings=true"),
    "bert": ("model.family=bert", "train.objective=mlm"),
    "t5": ("model.family=t5", "train.objective=span_corruption"),
}


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
@pytest.mark.parametrize("family", list(FAMILIES))
def test_other_families_match_one_device(family):
    """GPT-2, BERT and T5 on the layout that splits data, fsdp and tensor at once (each
    axis alone is LLaMA's above; what differs by family is which weights each axis
    splits): same losses and updates as one device, and the embedding laid out (and its
    Adam moments) as the preset says."""
    layout = "dp2_fsdp2_tp2"
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

"""The chunked cross-entropy (jaxtrain/train/loss.py): the loss and every parameter's
gradient equal the whole-logits loss's to float32 precision, for each family's head (own,
tied, BERT's transform and bias, T5's scaled tied embedding), with weights, padding and a
sharded mesh; the head's gradient sums over chunks in float32; splitting into chunks
moves no activations between devices and reduces the head's gradient once, not once per
chunk; the train step's temporary memory falls; and ``train.loss_chunk_tokens`` is wired
through the compiled program."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.bounds import relative_error
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import TINY

from jaxtrain import config, models
from jaxtrain.data import Objective
from jaxtrain.errors import UserError
from jaxtrain.models.layers import VocabHead
from jaxtrain.sharding import MESH_AXES, ActivationSharding, make_mesh, path_str, preset
from jaxtrain.train import build_program, model_spec
from jaxtrain.train.loss import chunk_count, chunked_cross_entropy_sum, cross_entropy_sum
from jaxtrain.train.step import model_inputs

# A vocabulary no other dimension of the tiny models shares (V/2 = 80 under tensor=2),
# so a collective that moves the head's parameters can be told apart in the HLO.
VOCAB = 160
HEADS = {
    "llama": (),  # its own head [D, V]
    "gpt2": ("model.family=gpt2", "model.n_kv_heads=4", "model.tie_embeddings=true"),
    "bert": ("model.family=bert", "train.objective=mlm", "model.tie_embeddings=true"),
    "t5": ("model.family=t5", "train.objective=span_corruption", "model.tie_embeddings=true"),
}
LAYOUTS = {
    "fsdp4_tp2": ("mesh.preset=fsdp_tp", "mesh.fsdp=4", "mesh.tensor=2"),
    "dp2_fsdp2_tp2": ("mesh.preset=fsdp_tp", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
}
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def tiny(family, *extra):
    return config.load(None, [*TINY, f"model.vocab_size={VOCAB}", *HEADS[family], *extra])


def random_batch(cfg):
    """Random tokens in the config's batch layout, with random 0/1 weights for every
    objective (the causal one's loss takes them as well)."""
    rng = np.random.default_rng(0)
    layout = Objective.from_config(cfg).layout(cfg.data.seq_len, cfg.data.packing)
    rows = cfg.train.global_batch
    batch = {
        key: rng.integers(0, VOCAB, size=(rows, length), dtype=np.int32)
        for key, (length, _) in layout.items()
        if key != "weights"
    }
    batch["weights"] = (rng.random(batch["targets"].shape) < 0.7).astype(np.float32)
    return batch


def whole_loss(spec, params, batch):
    """The reference: the model's default ``__call__`` logits, all at once."""
    logits = spec.apply(params, batch["inputs"], **model_inputs(batch))
    return cross_entropy_sum(logits, batch["targets"], batch["weights"])


def chunked_loss(spec, params, batch, chunks, row_shards=1):
    hidden, head = spec.apply(params, batch["inputs"], return_hidden=True, **model_inputs(batch))
    targets, weights = batch["targets"], batch["weights"]
    return chunked_cross_entropy_sum(
        hidden, head, targets, weights, chunks=chunks, row_shards=row_shards
    )


def value_and_grad(loss, *args):
    return jax.value_and_grad(lambda p: loss(p, *args), has_aux=True)


@functools.cache
def unsharded(family):
    """One device, one compile: (params, batch, {variant: ((loss, count), grads)}) for
    the whole logits (0) and 3 (padded) and 4 chunks."""
    cfg = tiny(family)
    spec = model_spec(cfg, None, None)
    model = models.build(cfg.model, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    batch = random_batch(cfg)

    @jax.jit
    def run(params, batch):
        whole = value_and_grad(functools.partial(whole_loss, spec), batch)(params)
        chunked = {
            n: value_and_grad(functools.partial(chunked_loss, spec), batch, n)(params)
            for n in (3, 4)
        }
        return {0: whole, **chunked}

    return cfg, params, batch, jax.device_get(run(params, batch))


def assert_same(result, reference, tol=1e-5):
    """Same count, loss and gradients. The attention key bias (GPT-2, BERT) is judged on
    the scale of all the gradients: its exact gradient is zero (softmax ignores a shift
    shared by all keys), so what it gets is rounding noise (see test_equivalence)."""
    ((loss, count), grads), ((ref_loss, ref_count), ref_grads) = result, reference
    assert float(count) == float(ref_count)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    flat = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
    ref_flat = dict(jax.tree_util.tree_flatten_with_path(ref_grads)[0])
    scale = max(np.max(np.abs(g)) for g in ref_flat.values())
    errors = {}
    for path, ref in ref_flat.items():
        if path_str(path).endswith("attn/bk"):
            errors[path_str(path)] = float(np.max(np.abs(flat[path] - ref)) / scale)
        else:
            errors[path_str(path)] = relative_error(flat[path], ref)
    assert max(errors.values()) <= tol, errors


def test_chunk_count():
    assert chunk_count(2, 8192, 0) == 1  # off
    assert chunk_count(2, 8192, 16384) == 1  # fits
    assert chunk_count(2, 8192, 4096) == 4  # Llama 3 8B's microbatch per device
    assert chunk_count(2, 8192, 3000) == 8  # 6 is the fewest; 8 divides 8192
    assert chunk_count(1, 511, 100) == 7  # 511 = 7 * 73: 6 would need padding
    assert chunk_count(1, 509, 100) == 6  # a prime length: the fewest, padded
    assert chunk_count(4, 16, 1) == 16  # never finer than one position of every row


@pytest.mark.parametrize("family", list(HEADS))
def test_chunked_matches_whole(family):
    cfg, _, batch, results = unsharded(family)
    length = batch["targets"].shape[1]
    assert length % 3, "3 chunks should pad the length"
    for n in (3, 4):
        assert_same(results[n], results[0])


def test_default_call_returns_head_of_hidden():
    """``__call__`` still returns the logits: exactly the head applied to the hidden."""
    cfg, params, batch, _ = unsharded("bert")
    spec = model_spec(cfg, None, None)
    logits = spec.apply(params, batch["inputs"])
    hidden, head = spec.apply(params, batch["inputs"], return_hidden=True)
    assert isinstance(head, VocabHead) and head.bias is not None and head.tied
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(head(hidden)))


@functools.cache
def sharded(family, layout, row_shards=None):
    """Loss and grads of the chunked loss (4 chunks) on the 8-device mesh, the batch and
    parameters in the program's shardings; and the compiled HLO."""
    cfg, params, batch, _ = unsharded(family)
    cfg = tiny(family, *LAYOUTS[layout])
    program = build_program(cfg, make_mesh(cfg, jax.devices()))
    rows = program.batch_sharding.shard_shape(batch["targets"].shape)[0]
    row_shards = row_shards or cfg.train.global_batch // rows
    params = jax.device_put(params, program.state_shardings.params)
    batch = jax.device_put(batch, program.batch_sharding)

    def run(params, batch, chunks, row_shards):
        loss = functools.partial(chunked_loss, program.spec)
        return value_and_grad(loss, batch, chunks, row_shards)(params)

    compiled = jax.jit(run, static_argnums=(2, 3)).lower(params, batch, 4, row_shards).compile()
    return jax.device_get(compiled(params, batch)), compiled.as_text(), row_shards


@pytest.mark.parametrize(
    "family,layout",
    [
        ("llama", "fsdp4_tp2"),
        ("llama", "dp2_fsdp2_tp2"),
        ("bert", "fsdp4_tp2"),
        ("t5", "dp2_fsdp2_tp2"),
    ],
)
def test_sharded_chunked_matches_whole(family, layout):
    result, _, row_shards = sharded(family, layout)
    assert row_shards == 4
    assert_same(result, unsharded(family)[3][0])


def collectives(hlo, *, in_loops=False):
    """(op, result shape) of every collective in optimized HLO text; ``in_loops``: only
    those outside the entry computation, i.e. in loop bodies (XLA puts no collective
    inside a fusion)."""
    found, entry = [], False
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            entry = line.startswith("ENTRY")
        match = re.search(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if match and not (in_loops and entry):
            found.append((match.group(2), match.group(1)))
    return found


def test_chunks_move_no_head_parameters_inside_the_loop():
    """Inside the scans (the layers' and the loss's) no collective moves the head's
    parameters or their gradient (V/2 = 80 under tensor=2): they are gathered once and
    reduced once. With one shared copy (row_shards=1) each chunk's gradient would be
    all-reduced over the batch's devices: the check can fail."""
    _, hlo, _ = sharded("llama", "fsdp4_tp2")
    vocab_dims = re.compile(r"\b(80|160)\b")
    assert not [c for c in collectives(hlo, in_loops=True) if vocab_dims.search(c[1])]
    _, shared, _ = sharded("llama", "fsdp4_tp2", row_shards=1)
    assert [c for c in collectives(shared, in_loops=True) if vocab_dims.search(c[1])]


def scan_carries(jaxpr):
    """The carry avals of every scan in a jaxpr, nested ones included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            consts, carries = eqn.params["num_consts"], eqn.params["num_carry"]
            out += [v.aval for v in eqn.invars[consts : consts + carries]]
        for param in eqn.params.values():
            for inner in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    out += scan_carries(inner)
    return out


def test_head_gradient_sums_over_chunks_in_float32():
    """bfloat16 compute: the backward scan carries the head's gradient [1, 1, D, V] in
    float32 (the cast to bfloat16 happens inside each chunk's body)."""
    cfg = tiny("llama", "model.compute_dtype=bfloat16")
    spec = model_spec(cfg, None, None)
    batch = random_batch(cfg)
    grad = value_and_grad(functools.partial(chunked_loss, spec), batch, 4)
    jaxpr = jax.make_jaxpr(grad)(spec.abstract_params)
    d, v = cfg.model.d_model, VOCAB
    carried = [a for a in scan_carries(jaxpr.jaxpr) if a.shape == (1, 1, d, v)]
    assert carried and all(a.dtype == jnp.float32 for a in carried), carried


def test_sequence_sharded_chunks_stay_local():
    """A length split over ``sequence`` (and rows over ``data``, vocabulary over
    ``tensor``): the interleaved chunks need no all-gather, all-to-all or permute, and
    with a copy of the head per run of positions (``sequence_shards``) no chunk's head
    gradient is reduced inside the loop; with one copy per row shard it is."""
    rules = preset("fsdp_tp")
    rules = dataclasses.replace(rules, params=(*rules.params, ("length", "sequence")))
    mesh = jax.make_mesh(
        (2, 1, 1, 1, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 6
    )
    shard = ActivationSharding(mesh, rules)
    b, length, d = 4, 32, 16
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, (b, length)), jnp.int32)
    weights = jnp.asarray(rng.random((b, length)) < 0.7, jnp.float32)
    weight = jnp.asarray(rng.normal(size=(VOCAB, d)) * 0.1, jnp.float32)
    bias = jnp.asarray(rng.normal(size=(VOCAB,)) * 0.1, jnp.float32)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
    tokens = ("data", "sequence")
    args = (
        put(hidden, *tokens),
        put(weight, "tensor"),
        put(bias, "tensor"),
        put(targets, *tokens),
        put(weights, *tokens),
    )

    def loss(hidden, weight, bias, targets, weights, chunks, row_shards, ways):
        head = VocabHead(weight, bias, tied=True, dtype=jnp.float32, shard=shard, scale=0.5)
        return chunked_cross_entropy_sum(
            hidden,
            head,
            targets,
            weights,
            chunks=chunks,
            row_shards=row_shards,
            sequence_shards=ways,
        )[0]

    def run(chunks, row_shards=2, ways=2):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=(5, 6, 7))
        compiled = fn.lower(*args, chunks, row_shards, ways).compile()
        return jax.device_get(compiled(*args)), compiled.as_text()

    (whole, whole_grads), _ = run(1)
    (value, grads), hlo = run(4)  # 4 chunks of 8 positions: 4 per device
    (odd_value, odd_grads), _ = run(4, row_shards=3)  # not dividing B: one shared copy
    (one_value, one_grads), one_copy = run(4, ways=1)  # one copy per row shard
    (few_value, few_grads), _ = run(16)  # 16 x 2 does not divide 32: one copy per row shard
    for v, gs in ((value, grads), (odd_value, odd_grads), (one_value, one_grads),
                  (few_value, few_grads)):  # fmt: skip
        np.testing.assert_allclose(v, whole, rtol=1e-6)
        for g, ref in zip(gs, whole_grads, strict=True):
            assert relative_error(g, ref) <= 1e-5
    moved = [c for c in collectives(hlo) if c[0] != "all-reduce"]
    assert not moved, moved
    # Inside the loop only tensor parallelism's per-token sums remain (softmax
    # statistics, the hidden state's gradient); nothing of vocabulary size (V/2 = 40).
    vocab_dims = re.compile(r"\b(40|80)\b")
    assert not [c for c in collectives(hlo, in_loops=True) if vocab_dims.search(c[1])]
    assert [c for c in collectives(one_copy, in_loops=True) if vocab_dims.search(c[1])]


@functools.cache
def program_pair():
    """The compiled train and eval steps of two programs, whole and chunked logits."""
    base = (*LAYOUTS["fsdp4_tp2"], "train.microbatches=2", "model.tie_embeddings=true")
    out = {}
    for tokens in (0, 4):  # 1 row x 16 positions per device and microbatch: 4 chunks
        cfg = tiny("llama", *base, f"train.loss_chunk_tokens={tokens}")
        out[tokens] = build_program(cfg, make_mesh(cfg, jax.devices()))
    return out


def test_program_steps_match_whole():
    """``train.loss_chunk_tokens`` reaches the compiled steps, which give the same loss,
    gradient norm and evaluation as the whole logits."""
    programs = program_pair()
    layout = programs[0].abstract_batch()
    batch = {key: x for key, x in random_batch(programs[0].config).items() if key in layout}
    metrics, evals, scans = {}, {}, {}
    for tokens, program in programs.items():
        state = program.init_state()
        placed = jax.device_put(batch, program.batch_sharding)
        scans[tokens] = str(jax.make_jaxpr(program.train_step)(state, placed)).count(" scan[")
        evals[tokens] = jax.device_get(program.eval_step(state.params, placed))
        _, metrics[tokens] = jax.device_get(program.train_step(state, placed))
    assert scans[4] > scans[0], scans  # the chunks' scan
    for key in ("loss", "grad_norm", "update_norm", "param_norm"):
        np.testing.assert_allclose(metrics[4][key], metrics[0][key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(evals[4]["loss_sum"], evals[0]["loss_sum"], rtol=1e-6)
    assert evals[4]["count"] == evals[0]["count"]


def test_temp_memory_drops_for_a_large_vocabulary():
    """A vocabulary of 32768 on 8 devices (ZeRO-3), 512 tokens per device: their float32
    logits are 64 MiB. In 8 chunks the step's temporary memory falls by more than that
    (the logits' gradient goes too; a float32 copy of the head and of its gradient come)."""
    temps = {}
    for tokens in (0, 64):
        overrides = ["model.vocab_size=32768", "data.seq_len=512", "mesh.fsdp=8"]
        cfg = config.load(None, [*TINY, *overrides, f"train.loss_chunk_tokens={tokens}"])
        program = build_program(cfg, make_mesh(cfg, jax.devices()))
        compiled, _ = program.compile()
        temps[tokens] = compiled.memory_analysis().temp_size_in_bytes
    logits = 512 * 32768 * 4
    assert temps[64] < temps[0] - logits, temps


def test_negative_chunk_tokens_is_a_config_error():
    with pytest.raises(UserError, match=r"^train\.loss_chunk_tokens: must be >= 0"):
        config.load(None, ["train.loss_chunk_tokens=-1"])

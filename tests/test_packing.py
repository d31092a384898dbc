"""Packed sequences: documents share a row but not attention, positions or targets."""

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import TINY

from jaxtrain import config
from jaxtrain.data import Loader, TokenDataset, document_boundaries, sample_windows
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program

EOS = 0


def test_document_boundaries():
    e = EOS
    inputs = np.array([[5, 6, e, 7, e, e, 8], [e, 1, 2, 3, 4, 5, 6]])
    got = document_boundaries(inputs, EOS)
    np.testing.assert_array_equal(
        got["segment_ids"], [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    )
    np.testing.assert_array_equal(got["positions"], [[0, 1, 2, 0, 1, 0, 0], [0, 0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(got["weights"], [[1, 1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 1, 1, 1]])
    assert {k: v.dtype for k, v in got.items()} == {
        "segment_ids": np.int32,
        "positions": np.int32,
        "weights": np.float32,
    }


def test_packed_loader_is_deterministic_and_row_local():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 257, 5000).astype(np.uint16)
    tokens[rng.random(5000) < 0.05] = EOS
    ds = TokenDataset(train=tokens, validation=tokens[:600], vocab_size=257, eos_id=EOS, source="t")

    def make():
        return Loader(ds, seed=3, global_batch=16, seq_len=32, sharding=sharding, packing=True)

    loader = make()
    for batch, again, split, stream in [
        (loader.train_batch(5), make().train_batch(5), ds.train, 0),
        (loader.eval_batch(1), make().eval_batch(1), ds.validation, 1),
    ]:
        window = sample_windows(
            split, seed=3, step=5 if stream == 0 else 1, stream=stream, batch=16, seq_len=32
        )
        want = window | document_boundaries(window["inputs"], EOS)
        assert batch.keys() == want.keys()
        for key, value in batch.items():
            assert value.sharding == sharding and value.dtype == want[key].dtype
            np.testing.assert_array_equal(np.asarray(value), want[key])
            np.testing.assert_array_equal(np.asarray(value), np.asarray(again[key]))
        assert np.asarray(batch["segment_ids"]).max() > 0  # the rows really hold documents
    # Another process builds only its own rows; they are the global batch's rows.
    part = sample_windows(
        ds.train, seed=3, step=5, stream=0, batch=16, seq_len=32, rows=range(4, 8)
    )
    for key, value in document_boundaries(part["inputs"], EOS).items():
        np.testing.assert_array_equal(value, np.asarray(loader.train_batch(5)[key])[4:8])


def token_losses(program):
    """A jitted ``(params, inputs, targets, **boundaries) -> [B, L]`` per-token loss."""

    @jax.jit
    def losses(params, inputs, targets, boundaries):
        logits = program.spec.apply(params, inputs, **boundaries)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

    return lambda params, inputs, targets, **kw: np.asarray(losses(params, inputs, targets, kw))


def test_packed_rows_give_each_document_its_own_loss():
    """Per-token losses of a packed row equal those of its documents run one by one, and
    the eval step's weighted sum counts exactly the in-document targets."""
    cfg = config.load(None, [*TINY, "mesh.fsdp=1", "data.packing=true"])
    program = build_program(cfg, make_mesh(cfg, jax.devices()[:1]))
    assert {k: v.dtype for k, v in program.abstract_batch().items()} == {
        "inputs": np.int32,
        "targets": np.int32,
        "segment_ids": np.int32,
        "positions": np.int32,
        "weights": np.float32,
    }
    params = program.init_state().params
    rng = np.random.default_rng(2)
    window = cfg.data.seq_len + 1
    rows, docs = [], []  # docs: (row, start, tokens ending in EOS)
    for row in range(cfg.train.global_batch):
        cuts = np.cumsum(rng.permutation([4, 6, 7]))[:2]  # three documents, 17 tokens
        tokens = rng.integers(1, cfg.model.vocab_size, size=window, dtype=np.int32)
        tokens[[*(cuts - 1), window - 1]] = EOS
        rows.append(tokens)
        docs += [(row, a, tokens[a:b]) for a, b in zip([0, *cuts], [*cuts, window], strict=True)]
    rows = np.stack(rows)
    batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
    batch |= document_boundaries(batch["inputs"], EOS)

    boundaries = {k: batch[k] for k in ("positions", "segment_ids")}
    losses = token_losses(program)
    packed = losses(params, batch["inputs"], batch["targets"], **boundaries)
    unaware = losses(params, batch["inputs"], batch["targets"])
    total, count = 0.0, 0
    for row, start, doc in docs:
        alone = losses(params, doc[None, :-1], doc[None, 1:])[0]
        span = slice(start, start + len(doc) - 1)
        np.testing.assert_allclose(packed[row, span], alone, rtol=1e-5, atol=1e-6)
        assert batch["weights"][row, span].all()
        if start > 0:  # a later document really does depend on the boundaries
            assert not np.allclose(unaware[row, span], alone, rtol=1e-3)
        total, count = total + alone.sum(), count + len(alone)
    assert batch["weights"].sum() == count  # only the targets across documents dropped
    out = program.eval_step(params, jax.device_put(batch, program.batch_sharding))
    assert float(out["count"]) == count
    np.testing.assert_allclose(float(out["loss_sum"]), total, rtol=1e-5)


def test_packing_is_a_data_key():
    assert config.load(None, ["data.packing=true"]).data.packing
    assert not config.Config().data.packing

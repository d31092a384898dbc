"""Generation equals transformers: greedy decoding of every decoder family's HF fixture,
and T5's, gives transformers' ``generate(do_sample=False)`` tokens, left-padded batches
included."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers.hf import FIXTURES, fixture_prompts, transformers_generate

from jaxtrain.generate.decode import decode_tokens, generate_tokens, prefill_tokens
from jaxtrain.generate.sampling import SamplingConfig
from jaxtrain.models import from_pretrained
from jaxtrain.models.hf import read_config

NEW = 10


@pytest.mark.parametrize(
    "name", ["llama", "llama3", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe", "gpt2", "t5"]
)
def test_greedy_equals_transformers(name):
    directory = FIXTURES / name
    rows, pad = fixture_prompts(directory)
    eos = read_config(directory).get("eos_token_id")
    want = transformers_generate(directory, rows, pad, max_new_tokens=NEW)

    _, model = from_pretrained(directory)
    graphdef, state = nnx.split(model)
    got, count = generate_tokens(
        graphdef,
        state,
        rows,
        pad,
        jax.random.PRNGKey(0),
        max_new=NEW,
        sampling=SamplingConfig(greedy=True),
        eos_id=eos,
        pad_id=0,
    )
    got = np.asarray(got)
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1] :] == 0).all()
    assert (np.asarray(count) <= NEW).all()


def run(directory, sampling, eos=None, seed=0):
    rows, pad = fixture_prompts(directory)
    _, model = from_pretrained(directory)
    graphdef, state = nnx.split(model)
    key = jax.random.PRNGKey(seed)
    out = generate_tokens(
        graphdef, state, rows, pad, key, max_new=NEW, sampling=sampling, eos_id=eos, pad_id=0
    )
    return tuple(np.asarray(x) for x in out)


def test_eos_stops_its_row_and_sampling_is_seeded():
    directory = FIXTURES / "llama"
    greedy, count = run(directory, SamplingConfig(greedy=True))
    assert (count == NEW).all()
    # The EOS is row 0's third greedy token: row 0 stops after it, row 1 goes on.
    eos = int(greedy[0, 2])
    stopped, count = run(directory, SamplingConfig(greedy=True), eos=eos)
    assert count[0] == 3 and (stopped[0, :3] == greedy[0, :3]).all()
    assert (stopped[0, 3:] == 0).all()
    first_eos = np.flatnonzero(greedy[1] == eos)
    assert count[1] == (first_eos[0] + 1 if first_eos.size else NEW)
    # top_k=1 is greedy; a seed reproduces a draw and another seed differs.
    assert (run(directory, SamplingConfig(top_k=1))[0] == greedy).all()
    hot = SamplingConfig(temperature=1.5)
    a, b, c = (run(directory, hot, seed=s)[0] for s in (1, 1, 2))
    assert (a == b).all() and not (a == c).all()


def test_prefill_and_decode_apart_equal_generate():
    """The two jitted halves called one after the other (as a server would) give the
    one-program generate's sampled tokens."""
    directory = FIXTURES / "llama"
    hot = SamplingConfig(temperature=1.3)
    want = run(directory, hot, seed=5)
    rows, pad = fixture_prompts(directory)
    graphdef, state = nnx.split(from_pretrained(directory)[1])
    key = jax.random.PRNGKey(5)
    prefilled = prefill_tokens(graphdef, state, rows, pad, key, max_new=NEW, sampling=hot)
    got = decode_tokens(graphdef, state, prefilled, max_new=NEW, sampling=hot)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize(
    "mesh", [{"fsdp": 8}, {"fsdp": 4, "tensor": 2, "preset": "fsdp_tp"}], ids=["fsdp8", "fsdp4_tp2"]
)
def test_generation_on_8_devices_equals_one_device(mesh):
    """The parameters sharded over 8 devices (and the cache's heads over tensor): the
    same tokens, and the same sampled tokens for a seed, as on one device."""
    from jaxtrain import config
    from jaxtrain.sharding import make_mesh, preset

    directory = FIXTURES / "qwen3"
    cfg = config.from_dict({"mesh": mesh})
    rules = preset(cfg.mesh.preset).within_batch_shard()
    _, sharded = from_pretrained(directory, make_mesh(cfg), rules=rules)
    assert len(sharded.blocks.attn.wq[...].sharding.device_set) == 8
    rows, pad = fixture_prompts(directory)
    for sampling in (SamplingConfig(greedy=True), SamplingConfig(temperature=1.3, top_p=0.9)):
        graphdef, state = nnx.split(sharded)
        key = jax.random.PRNGKey(7)
        got = generate_tokens(graphdef, state, rows, pad, key, max_new=NEW, sampling=sampling)
        want = run(directory, sampling, seed=7)
        np.testing.assert_array_equal(np.asarray(got[0]), want[0])

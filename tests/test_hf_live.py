"""Live round trip through transformers (skipped unless torch and transformers import):
fresh random HF models -> jaxtrain import -> forward -> export -> transformers'
``from_pretrained`` (``AutoModelForCausalLM``, ``AutoModelForMaskedLM``,
``AutoModelForSeq2SeqLM``), with logits compared both ways and every parameter identical
after the trip. T5 also runs with the original T5's tied, scaled head and with the head
transformers 5 ties to ``shared`` unscaled; the mixtures of experts (Mixtral, Qwen3-MoE)
also with a window and with renormalised top-k weights."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain.models import from_pretrained, save_pretrained

torch = pytest.importorskip("torch", reason="the live round trip needs torch")
transformers = pytest.importorskip("transformers", reason="the live round trip needs transformers")

pytestmark = pytest.mark.slow  # builds and runs every HF variant in torch

_spec = importlib.util.spec_from_file_location(
    "make_hf_fixtures", Path(__file__).resolve().parents[1] / "tools" / "make_hf_fixtures.py"
)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)


# transformers' input names -> ours (input_ids is the first positional argument)
KWARGS = {"token_type_ids": "token_types", "decoder_input_ids": "decoder_inputs"}


@pytest.mark.parametrize("name", list(fixtures.LIVE_VARIANTS))
def test_round_trip_through_transformers(name, tmp_path):
    original = fixtures.build(name, seed=7)  # not the committed fixtures' seed
    original.save_pretrained(tmp_path / "hf")
    feed = fixtures.inputs(name, seed=7)
    want = fixtures.logits(original, feed)

    cfg, model = from_pretrained(tmp_path / "hf")
    graphdef, state = nnx.split(model)
    kwargs = {KWARGS[k]: jnp.asarray(v) for k, v in feed.items() if k != "input_ids"}
    run = jax.jit(lambda s, t, kw: nnx.merge(graphdef, s)(t, **kw))
    ours = np.asarray(run(state, jnp.asarray(feed["input_ids"]), kwargs))
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-4)

    save_pretrained(cfg, model, tmp_path / "out")
    reloaded, info = fixtures.auto_class(name).from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True
    )
    assert type(reloaded) is type(original)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    np.testing.assert_allclose(fixtures.logits(reloaded.eval(), feed), ours, rtol=0, atol=1e-4)
    before, after = original.state_dict(), reloaded.state_dict()
    assert set(before) == set(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key

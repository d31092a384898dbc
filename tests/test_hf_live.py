"""Live round trip through transformers (skipped unless torch and transformers import):
fresh random HF models -> jaxtrain import -> forward -> export ->
``transformers.AutoModelForCausalLM.from_pretrained``, with logits compared both ways
and every parameter identical after the trip."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtrain.models import from_pretrained, save_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location(
    "make_hf_fixtures", Path(__file__).resolve().parents[1] / "tools" / "make_hf_fixtures.py"
)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)


@pytest.mark.parametrize("name", list(fixtures.VARIANTS))
def test_round_trip_through_transformers(name, tmp_path):
    original = fixtures.build(name, seed=7)  # not the committed fixtures' seed
    original.save_pretrained(tmp_path / "hf")
    ids = fixtures.inputs(seed=7)
    want = fixtures.logits(original, ids)

    cfg, model = from_pretrained(tmp_path / "hf")
    graphdef, state = nnx.split(model)
    ours = np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-4)

    save_pretrained(cfg, model, tmp_path / "out")
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", output_loading_info=True
    )
    assert type(reloaded) is type(original)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    np.testing.assert_allclose(fixtures.logits(reloaded.eval(), ids), ours, rtol=0, atol=1e-4)
    before, after = original.state_dict(), reloaded.state_dict()
    assert set(before) == set(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key

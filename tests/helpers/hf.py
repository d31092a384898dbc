"""The committed Hugging Face fixtures (``tests/fixtures/hf``, made by
``tools/make_hf_fixtures.py``) and what the HF parity, generation and beam tests do with
them: read a fixture, run our model on its inputs, read a checkpoint's tensors, and ask
transformers for its own generation."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from jaxtrain import models
from jaxtrain.generate.decode import left_pad

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
# transformers' input names -> ours (input_ids is the first positional argument)
KWARGS = {"token_type_ids": "token_types", "decoder_input_ids": "decoder_inputs"}


def fixture(name):
    """(directory, inputs by transformers' names, transformers' logits)."""
    d = FIXTURES / name
    feed = {p.stem: np.load(p) for p in d.glob("*.npy") if p.stem != "logits"}
    return d, feed, np.load(d / "logits.npy")


def forward(model, feed, **extra):
    """Our logits for ``feed``: token ids, or inputs by transformers' names."""
    feed = feed if isinstance(feed, dict) else {"input_ids": feed}
    kwargs = {KWARGS[k]: jnp.asarray(v) for k, v in feed.items() if k != "input_ids"}
    kwargs |= {k: jnp.asarray(v) for k, v in extra.items()}
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda s, t, kw: nnx.merge(graphdef, s)(t, **kw))
    return np.asarray(run(state, jnp.asarray(feed["input_ids"]), kwargs))


def hf_tensors(directory):
    """Every tensor of a checkpoint directory's safetensors files, by name."""
    out = {}
    for file in Path(directory).glob("*.safetensors"):
        with safe_open(file, framework="np") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    return out


def abstract_graph(cfg):
    """The graph of ``cfg``'s model, built abstractly (no parameters allocated)."""
    return nnx.graphdef(nnx.eval_shape(lambda: models.build(cfg, rngs=nnx.Rngs(0))))


def fixture_prompts(directory):
    """Two prompts of a fixture's input ids, 9 and 4 tokens: left-padded by 0 and 5."""
    ids = np.load(directory / "input_ids.npy")
    return left_pad([ids[0, :9].tolist(), ids[1, :4].tolist()], pad_id=0)


def transformers_generate(directory, rows, pad, **options):
    """transformers' greedy ``generate`` (with ``options``) of a fixture: the new tokens.
    T5's prompt is its encoder's, and its output opens with the decoder start token."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    seq2seq = directory.name == "t5"
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    hf = auto.from_pretrained(directory, dtype=torch.float32)
    mask = (np.arange(rows.shape[1])[None, :] >= pad[:, None]).astype(np.int64)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(rows, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            pad_token_id=0,
            **options,
        )
    return out[:, 1:].numpy() if seq2seq else out[:, rows.shape[1] :].numpy()

"""The model zoo beyond plain LLaMA: config switches and their validation, the GPT-2,
BERT and T5 parameters, every preset resolving for every family, and a training smoke
test per family and objective (GPT-2 end to end through ``jaxtrain train`` and
``jaxtrain export``, BERT's masked-LM through ``jaxtrain train``, T5's span corruption
from the loader)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import TINY

from jaxtrain import cli, config
from jaxtrain.data import builtin_corpus, load_tokenizer
from jaxtrain.errors import UserError
from jaxtrain.metrics import count_params
from jaxtrain.models import from_pretrained
from jaxtrain.plan import state_plan
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program, model_spec
from jaxtrain.train.optim import decay_mask

# Every llama-family switch at once (no HF class has all of them; the model does).
ALL_SWITCHES = (
    "model.qkv_bias=true",
    "model.qk_norm=true",
    "model.sliding_window=4",
    "model.head_dim=32",
    "model.rope_scaling.kind=llama3",
    "model.rope_scaling.original_max_len=8",
)
GPT2 = (
    "model.family=gpt2",
    "model.n_kv_heads=4",
    "model.tie_embeddings=true",
    "model.max_seq_len=64",
)
BERT = ("model.family=bert", "train.objective=mlm", "model.max_seq_len=64")
T5 = ("model.family=t5", "train.objective=span_corruption")
FAMILIES = {"llama": ALL_SWITCHES, "gpt2": GPT2, "bert": BERT, "t5": T5}
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"


def tiny(*extra):
    return config.load(None, [*TINY, *extra])


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.family=gpt2", "model.qk_norm=true"], "model.qk_norm"),
        (["model.family=gpt2", "model.rope_scaling.kind=llama3"], "model.rope_scaling.kind"),
        (["model.head_dim=7"], "model.head_dim"),
        (["model.d_model=30", "model.n_heads=4"], "model.n_heads"),
        (["model.sliding_window=-1"], "model.sliding_window"),
        (["model.rope_scaling.kind=yarn"], "model.rope_scaling.kind"),
        (["model.rope_scaling.high_freq_factor=0.5"], "model.rope_scaling.high_freq_factor"),
        (["model.init_from=/some/dir"], "model.init_from"),
    ],
)
def test_bad_switches_are_one_line_errors_naming_the_key(overrides, key):
    with pytest.raises(UserError, match=f"^{key}: ") as err:
        tiny(*overrides)
    assert "\n" not in str(err.value)


def test_head_dim_defaults_to_width_over_heads_and_may_differ():
    assert tiny().model.head_dim == 16
    cfg = tiny("model.d_model=30", "model.n_heads=4", "model.head_dim=8")
    assert cfg.model.head_dim == 8
    spec = model_spec(cfg, None, None)
    assert spec.abstract_params["blocks"]["attn"]["wq"].shape == (2, 30, 4, 8)
    reloaded = config.from_dict(cfg.to_dict())
    assert reloaded == cfg


def test_gpt2_parameters_axes_and_weight_decay():
    spec = model_spec(tiny(*GPT2), None, None)
    params, logical = spec.abstract_params, spec.logical
    assert "lm_head" not in params and params["pos_embed"].shape == (64, 64)
    assert logical["pos_embed"] == ("positions", "embed")
    assert logical["blocks"]["attn"]["bq"] == ("layers", "heads", "bias")
    assert logical["blocks"]["mlp"]["b_in"] == ("layers", "bias")
    decay = decay_mask(logical)
    assert decay["blocks"]["mlp"]["w_in"] and decay["pos_embed"]
    assert not decay["blocks"]["mlp"]["b_out"] and not decay["blocks"]["attn_norm"]["bias"]
    # 2 layers of width 64 (MLP 128) + 128 x 64 tokens + 64 x 64 positions.
    layer = 4 * 64 * 64 + 4 * 64 + 2 * 64 * 128 + 128 + 64 + 4 * 64
    assert count_params(params) == 2 * layer + 128 * 64 + 64 * 64 + 2 * 64


def test_bert_and_t5_parameters_axes_and_weight_decay():
    bert = model_spec(tiny(*BERT), None, None)
    logical, params = bert.logical, bert.abstract_params
    assert logical["type_embed"] == ("token_types", "embed") and params["type_embed"].shape[0] == 2
    assert logical["pos_embed"] == ("positions", "embed") and params["pos_embed"].shape == (64, 64)
    assert params["lm_head"].shape == (64, 128)  # untied: model.tie_embeddings is false
    assert logical["blocks"]["attn"]["bo"] == ("layers", "bias")
    assert logical["head_w"] == ("embed", "mlp") and logical["out_bias"] == ("bias",)
    decay = decay_mask(logical)
    assert decay["head_w"] and not decay["out_bias"] and not decay["blocks"]["mlp_norm"]["bias"]
    t5 = model_spec(tiny(*T5), None, None)
    logical, params = t5.logical, t5.abstract_params
    assert logical["encoder_bias"] == logical["decoder_bias"] == ("rel_buckets", "heads")
    assert params["decoder_bias"].shape == (32, 4)  # one table per stack, not per layer
    assert logical["decoder"]["cross_attn"]["wq"] == ("layers", "embed", "heads", "head_dim")
    assert (
        params["encoder"]["mlp"]["w_gate"].shape == (2, 64, 128)
        and "bq" not in params["encoder"]["attn"]
    )
    for spec in (bert, t5):  # every parameter names each of its axes
        for axes in jax.tree.leaves(spec.logical, is_leaf=lambda x: isinstance(x, tuple)):
            assert None not in axes, axes


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("preset", ["dp", "fsdp", "fsdp_tp", "zero1"])
def test_every_preset_resolves_for_every_family(family, preset):
    extra = FAMILIES[family]
    mesh = {"fsdp_tp": ["mesh.tensor=2"], "dp": ["mesh.data=8", "mesh.fsdp=1"]}.get(preset, [])
    cfg = tiny(*extra, f"mesh.preset={preset}", *mesh)
    params, _ = state_plan(build_program(cfg, make_mesh(cfg)))
    sharded = [r for r in params if r.bytes_per_device < r.bytes_total]
    assert bool(sharded) == (preset != "dp" and preset != "zero1")


def test_llama_with_every_switch_trains():
    cfg = tiny(*ALL_SWITCHES, "optim.warmup_steps=0", "optim.lr=0.01", "mesh.fsdp=1")
    program = build_program(cfg, make_mesh(cfg, jax.devices()[:1]))
    state = program.init_state()
    rows = np.random.default_rng(0).integers(0, 128, (8, 17)).astype(np.int32)
    batch = jax.device_put({"inputs": rows[:, :-1], "targets": rows[:, 1:]}, program.batch_sharding)
    losses = []
    for _ in range(4):
        state, metrics = program.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses


def test_bert_keeps_packed_documents_apart():
    """With segment ids and restarting positions, a document's logits are the same
    alone as packed behind another one (attention never crosses; MLM + packing)."""
    _, model = from_pretrained(FIXTURES / "bert")  # spread-out weights, no init to compile
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda t, p, s: nnx.merge(graphdef, state)(t, positions=p, segment_ids=s))
    rng = np.random.default_rng(0)
    first, second = rng.integers(0, 96, (1, 5)), rng.integers(0, 96, (1, 11))
    packed = jnp.asarray(np.concatenate([first, second], axis=1))
    positions = jnp.asarray([[*range(5), *range(11)]])
    together = run(packed, positions, jnp.asarray([[0] * 5 + [1] * 11]))
    alone = run(jnp.asarray(second), jnp.arange(11)[None], jnp.zeros((1, 11), jnp.int32))
    np.testing.assert_allclose(together[:, 5:], alone, rtol=0, atol=1e-5)
    unpacked = run(packed, positions, jnp.zeros((1, 16), jnp.int32))
    assert np.abs(unpacked[:, 5:] - alone).max() > 1e-3


def test_t5_trains_on_span_corruption_from_the_loader():
    """Real span-corrupted batches (encoder 32, decoder 8 tokens), with remat: the loss
    falls, and evaluation counts every target."""
    extra = ("data.seq_len=32", "model.vocab_size=512", "model.remat=dots_saveable")
    cfg = tiny(*T5, *extra, "optim.warmup_steps=0", "optim.lr=0.01", "mesh.fsdp=1")
    program = build_program(cfg, make_mesh(cfg, jax.devices()[:1]))
    loader = program.loader(builtin_corpus(load_tokenizer("byte")))
    state, losses = program.init_state(), []
    for step in range(6):
        state, metrics = program.train_step(state, loader.train_batch(step % 2))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0, losses
    out = program.eval_step(state.params, loader.eval_batch(0))
    assert float(out["count"]) == 8 * loader.train_batch(0)["targets"].shape[1]


def test_bert_trains_with_mlm_through_the_cli(tmp_path):
    run = tmp_path / "run"
    args = ["model.family=bert", "train.objective=mlm", *TINY, "model.vocab_size=512"]
    args += ["data.seq_len=32", "train.steps=8", "train.log_every=1"]
    args += ["optim.warmup_steps=0", "optim.lr=0.01", "train.eval_every=0", f"run.dir={run}"]
    assert cli.main(["train", *(x for a in args for x in ("--set", a))]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses


def test_gpt2_trains_and_exports_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    args = [*TINY, "model.family=gpt2", "model.n_kv_heads=4", "model.tie_embeddings=true"]
    args += ["model.vocab_size=512", "data.seq_len=32", "train.steps=8", "train.log_every=1"]
    args += ["optim.warmup_steps=0", "train.eval_every=0", f"run.dir={run}"]
    assert cli.main(["train", *(x for a in args for x in ("--set", a))]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses

    out = tmp_path / "hf"
    code = cli.main(["export", "--run", str(run), "--format", "hf", "--out", str(out)])
    assert code == 0 and "(hf)" in capsys.readouterr().out
    cfg, model = from_pretrained(out)
    assert cfg.family == "gpt2" and cfg.n_layers == 2 and cfg.vocab_size == 512
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]

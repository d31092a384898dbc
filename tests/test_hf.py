"""Hugging Face interop against committed fixtures (made by tools/make_hf_fixtures.py with
transformers on CPU torch): logit parity per architecture, sharded import, export that
round-trips every tensor bit for bit, config mapping, and refusal of pickles."""

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from helpers.hf import FIXTURES, abstract_graph, fixture, forward, hf_tensors
from safetensors.numpy import save_file

from jaxtrain import config
from jaxtrain.config import RopeScalingConfig
from jaxtrain.data import load_tokenizer
from jaxtrain.errors import UserError
from jaxtrain.models import from_pretrained, save_pretrained
from jaxtrain.models.hf import check_architecture, config_from_hf, config_to_hf, read_config
from jaxtrain.models.hf.files import Checkpoint
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program

NAMES = [
    "llama",
    "llama3",
    "qwen2",
    "qwen3",
    "mistral",
    "mixtral",
    "qwen3_moe",
    "gpt2",
    "bert",
    "roberta",
    "t5",
]
FAMILY = {"gpt2": "gpt2", "bert": "bert", "roberta": "roberta", "t5": "t5"}  # else llama


@pytest.mark.parametrize("name", NAMES)
def test_fixture_logits_match_transformers(name):
    directory, ids, want = fixture(name)
    cfg, model = from_pretrained(directory)
    assert want.std() > 0.5  # logits that spread out: a wrong layout cannot hide
    np.testing.assert_allclose(forward(model, ids), want, rtol=0, atol=1e-4)
    assert cfg.family == FAMILY.get(name, "llama")


def test_each_switch_is_what_makes_parity():
    """Turning off Llama 3.1 scaling or Mistral's window (same weights) breaks parity, so
    the fixtures really exercise them; Qwen's biases and norms are covered by the strict
    tensor accounting (a checkpoint tensor without a place is an error)."""
    for name, off in (
        ("llama3", {"rope_scaling": RopeScalingConfig()}),
        ("mistral", {"sliding_window": 0}),
    ):
        directory, ids, want = fixture(name)
        cfg, model = from_pretrained(directory)
        plain = nnx.merge(abstract_graph(dataclasses.replace(cfg, **off)), nnx.state(model))
        assert np.abs(forward(plain, ids) - want).max() > 1e-2, name
    cfg = config_from_hf(FIXTURES / "qwen3")
    assert cfg.qk_norm and cfg.head_dim == 16 and cfg.head_dim * cfg.n_heads != cfg.d_model
    assert config_from_hf(FIXTURES / "qwen2").qkv_bias


def test_token_types_positions_and_buckets_are_what_make_parity():
    """BERT's second token type, RoBERTa's padding-aware positions and T5's logarithmic
    buckets (8 up to distance 20, over 24 tokens) each change the logits: the fixtures
    exercise them."""
    directory, feed, want = fixture("bert")
    _, model = from_pretrained(directory)
    one_type = {**feed, "token_type_ids": np.zeros_like(feed["token_type_ids"])}
    assert np.abs(forward(model, one_type) - want).max() > 1e-2
    directory, feed, want = fixture("roberta")
    _, model = from_pretrained(directory)
    plain = forward(model, feed, positions=np.broadcast_to(np.arange(24), (2, 24)))
    assert np.abs(plain - want).max() > 1e-2  # pad tokens move the positions after them
    directory, feed, want = fixture("t5")
    cfg, model = from_pretrained(directory)
    assert (cfg.relative_buckets, cfg.relative_max_distance, cfg.head_dim) == (8, 20, 4)
    graph = abstract_graph(dataclasses.replace(cfg, relative_max_distance=8))
    near = nnx.merge(graph, nnx.state(model))
    assert np.abs(forward(near, feed) - want).max() > 1e-2


@pytest.mark.parametrize(
    "name,mesh",
    [
        ("llama", {"fsdp": 8}),
        ("llama", {"fsdp": 4, "tensor": 2, "preset": "fsdp_tp"}),
        ("qwen3", {"fsdp": 4, "tensor": 2, "preset": "fsdp_tp"}),
        ("qwen3_moe", {"fsdp": 4, "tensor": 2, "preset": "fsdp_tp"}),
        ("gpt2", {"fsdp": 8}),
        ("gpt2", {"fsdp": 4, "tensor": 2, "preset": "fsdp_tp"}),
        ("bert", {"fsdp": 8}),
        ("roberta", {"fsdp": 4, "tensor": 2, "preset": "fsdp_tp"}),
        ("t5", {"fsdp": 8}),
        ("t5", {"fsdp": 4, "tensor": 2, "preset": "fsdp_tp"}),
    ],
)
def test_import_onto_8_devices_equals_one_device(name, mesh, monkeypatch):
    directory, ids, want = fixture(name)
    cfg = config.from_dict({"mesh": mesh})
    reads = []
    read = Checkpoint.read
    monkeypatch.setattr(
        Checkpoint, "read", lambda self, *a: reads.append(read(self, *a)) or reads[-1]
    )
    _, model = from_pretrained(directory, make_mesh(cfg), rules=cfg.mesh.preset)
    # Each read is one device's block: with ZeRO-3 over 8, an eighth of a weight matrix.
    largest = max(t.size for t in hf_tensors(directory).values())
    assert max(r.size for r in reads) * cfg.mesh.fsdp <= largest
    wq = (model.decoder.cross_attn if name == "t5" else model.blocks.attn).wq[...]
    assert len(wq.sharding.device_set) == 8 and not wq.sharding.is_fully_replicated
    per_device = {s.data.shape for s in wq.addressable_shards}
    assert per_device == {wq.sharding.shard_shape(wq.shape)} and wq.shape not in per_device
    rows = {k: np.tile(v, (4, 1)) for k, v in ids.items()}  # 8 rows: split over data x fsdp
    np.testing.assert_allclose(forward(model, rows), np.tile(want, (4, 1, 1)), atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trips_every_tensor_exactly(name, tmp_path):
    directory, ids, want = fixture(name)
    cfg, model = from_pretrained(directory)
    out = save_pretrained(cfg, model, tmp_path / "out", max_shard_bytes=40_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    original, exported = hf_tensors(directory), hf_tensors(out)
    assert set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    assert config_from_hf(out) == cfg
    _, again = from_pretrained(out)
    np.testing.assert_array_equal(forward(again, ids), forward(model, ids))


def test_one_file_below_the_shard_limit(tmp_path):
    cfg, model = from_pretrained(FIXTURES / "gpt2")
    out = save_pretrained(cfg, model, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_hub_layouts_bfloat16_without_prefix_with_buffers(tmp_path):
    """As the original GPT-2 on the Hub: bfloat16, names without ``transformer.``, and
    the causal-mask buffers ``h.N.attn.bias``; parameters come out float32."""
    tensors = hf_tensors(FIXTURES / "gpt2")
    hub = {k.removeprefix("transformer."): v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    hub |= {f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 32, 32), np.float32)) for i in range(2)}
    save_file(hub, tmp_path / "model.safetensors")
    shutil.copy(FIXTURES / "gpt2" / "config.json", tmp_path)
    _, model = from_pretrained(tmp_path)
    wte = model.embed[...]
    assert wte.dtype == jnp.float32
    want = tensors["transformer.wte.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(wte, want)
    (tmp_path / "model.safetensors").unlink()
    save_file({**hub, "h.0.extra.weight": np.zeros(3, np.float32)}, tmp_path / "x.safetensors")
    with pytest.raises(UserError, match="h.0.extra.weight"):
        from_pretrained(tmp_path)  # a tensor without a place is an error, never dropped


def test_original_bert_layout_imports(tmp_path):
    """As Google's BERT checkpoints on the Hub: TensorFlow's LayerNorm ``gamma``/``beta``
    names, BertForPreTraining's pooler and next-sentence head (no part of an MLM), the
    ``position_ids`` buffer and a saved copy of the tied decoder."""
    directory, feed, want = fixture("bert")
    tensors = hf_tensors(directory)
    hub = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in tensors.items()
    }
    assert sum(k.endswith(".gamma") for k in hub) == 6
    hub |= {
        "bert.pooler.dense.weight": np.ones((32, 32), np.float32),
        "bert.pooler.dense.bias": np.ones(32, np.float32),
        "cls.seq_relationship.weight": np.ones((2, 32), np.float32),
        "cls.seq_relationship.bias": np.ones(2, np.float32),
        "bert.embeddings.position_ids": np.arange(32)[None],
        "cls.predictions.decoder.weight": tensors["bert.embeddings.word_embeddings.weight"],
    }
    save_file(hub, tmp_path / "model.safetensors")
    shutil.copy(directory / "config.json", tmp_path)
    _, model = from_pretrained(tmp_path)
    np.testing.assert_allclose(forward(model, feed), want, rtol=0, atol=1e-4)


def test_pickled_checkpoints_are_refused_unopened(tmp_path):
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (Path.touch, (marker,))

    shutil.copy(FIXTURES / "llama" / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    with pytest.raises(UserError, match=r"pytorch_model\.bin.*safetensors"):
        from_pretrained(tmp_path)
    assert not marker.exists()
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes())
    assert marker.exists()  # the trap works: loading would have been caught


def test_config_mapping_and_refusals():
    hf = read_config(FIXTURES / "llama3")
    v5 = config_from_hf(hf)
    assert v5.rope_scaling.kind == "llama3" and v5.rope_theta == 500000.0
    assert v5.rope_scaling.original_max_len == 64 and v5.tie_embeddings
    # The transformers 4 spelling (rope_theta + rope_scaling) of the same model.
    v4 = {k: v for k, v in hf.items() if k != "rope_parameters"}
    v4["rope_theta"] = 500000.0
    v4["rope_scaling"] = {k: v for k, v in hf["rope_parameters"].items() if k != "rope_theta"}
    assert config_from_hf(v4) == v5
    assert config_from_hf(config_to_hf(v5)) == v5
    assert config_to_hf(config_from_hf(FIXTURES / "mistral"))["sliding_window"] == 5
    bert, t5 = read_config(FIXTURES / "bert"), read_config(FIXTURES / "t5")
    for bad, key in (
        ({**hf, "model_type": "gpt_neox"}, "model_type"),
        ({**bert, "hidden_act": "gelu_new"}, "hidden_act"),
        ({**bert, "tie_word_embeddings": False}, "tie_word_embeddings"),
        ({**bert, "position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({**t5, "feed_forward_proj": "relu"}, "feed_forward_proj"),
        ({**t5, "num_decoder_layers": 3}, "num_decoder_layers"),
        ({**hf, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({**hf, "mlp_bias": True}, "mlp_bias"),
        ({**read_config(FIXTURES / "qwen3"), "use_sliding_window": True}, "use_sliding_window"),
        ({**read_config(FIXTURES / "gpt2"), "activation_function": "relu"}, "activation"),
    ):
        with pytest.raises(UserError, match=key):
            config_from_hf(bad)
    gqa_gpt2 = config.ModelConfig(family="gpt2", n_heads=4, n_kv_heads=2)
    with pytest.raises(UserError, match="model.n_kv_heads"):
        config_to_hf(gqa_gpt2)
    with pytest.raises(UserError, match="model.qkv_bias"):
        config_to_hf(config.ModelConfig(qkv_bias=True, qk_norm=True))


def test_architecture_mismatch_names_the_keys_to_set():
    with pytest.raises(UserError) as err:
        check_architecture(config.ModelConfig(), FIXTURES / "qwen3")
    message = str(err.value)
    assert "\n" not in message
    for key in ("model.d_model=32", "model.head_dim=16", "model.qk_norm=true"):
        assert key in message


def test_init_from_starts_training_from_the_checkpoint():
    """The fresh state holds the checkpoint's parameters in the program's shardings, with
    a zero optimizer state, and its loss is the cross-entropy of transformers' logits."""
    directory, feed, want = fixture("qwen2")
    ids = feed["input_ids"]
    hf_model = dataclasses.asdict(config_from_hf(directory))
    cfg = config.from_dict(
        {
            "model": hf_model | {"init_from": f"hf:{directory}"},
            "mesh": {"fsdp": 4, "tensor": 2, "preset": "fsdp_tp"},
            "data": {"seq_len": 16},
            "train": {"global_batch": 8},
        }
    )
    program = build_program(cfg, make_mesh(cfg))
    state = program.init_state()
    _, reference = from_pretrained(directory)
    got = jax.tree.leaves(state.params)
    assert got[0].sharding == jax.tree.leaves(program.state_shardings.params)[0]
    for a, b in zip(got, jax.tree.leaves(nnx.to_pure_dict(nnx.state(reference))), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state) if x.ndim)
    rows = np.tile(ids, (4, 1))
    batch = {"inputs": rows[:, :16], "targets": rows[:, 1:17]}  # no packing: just these
    batch = jax.device_put(batch, program.batch_sharding)
    out = program.eval_step(state.params, batch)
    logits = np.tile(want, (4, 1, 1))[:, :16].astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, rows[:, 1:17, None], axis=-1).sum()
    np.testing.assert_allclose(float(out["loss_sum"]), expected, rtol=1e-5)


def test_t5_init_from_evaluates_to_transformers_loss():
    """An encoder-decoder through the program: imported into fsdp x tensor shardings, its
    eval step (decoder inputs from the batch) gives the cross-entropy of HF's logits."""
    directory, feed, want = fixture("t5")
    cfg = config.from_dict(
        {
            "model": dataclasses.asdict(config_from_hf(directory))
            | {"init_from": f"hf:{directory}"},
            "mesh": {"fsdp": 4, "tensor": 2, "preset": "fsdp_tp"},
            "data": {"seq_len": 24},
            "train": {"global_batch": 8, "objective": "span_corruption"},
        }
    )
    program = build_program(cfg, make_mesh(cfg))
    state = program.init_state()
    targets = np.roll(feed["decoder_input_ids"], -1, axis=1)
    batch = {
        "inputs": feed["input_ids"],
        "decoder_inputs": feed["decoder_input_ids"],
        "targets": targets,
    }
    batch = jax.device_put(
        {k: np.tile(v, (4, 1)) for k, v in batch.items()}, program.batch_sharding
    )
    out = program.eval_step(state.params, batch)
    logits = want.astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -4 * np.take_along_axis(logp, targets[..., None], axis=-1).sum()
    np.testing.assert_allclose(float(out["loss_sum"]), expected, rtol=1e-5)
    assert float(out["count"]) == targets.size * 4


def test_hf_directory_tokenizer_is_usable_as_data_tokenizer():
    tok = load_tokenizer(str(FIXTURES / "gpt2"))
    assert tok.eos_id == 0 and tok.vocab_size <= config_from_hf(FIXTURES / "gpt2").vocab_size
    ids = tok.encode("the model writes more text")
    assert tok.decode(ids) == "the model writes more text"

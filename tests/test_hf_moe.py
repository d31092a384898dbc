"""Hugging Face interop of the mixtures of experts (Mixtral, Qwen3-MoE) against the
committed fixtures, beyond the per-architecture parity and export of test_hf.py: the
routing switch the fixtures exercise, the fused expert layout of transformers 5's
modules, expert blocks read on their own, config mapping and refusals, and which of
``model.moe`` a checkpoint fixes."""

import dataclasses
import shutil

import numpy as np
import pytest
from flax import nnx
from helpers.hf import FIXTURES, abstract_graph, fixture, forward, hf_tensors
from safetensors.numpy import save_file

from jaxtrain import config
from jaxtrain.errors import UserError
from jaxtrain.models import from_pretrained
from jaxtrain.models.hf import check_architecture, config_from_hf, config_to_hf, read_config
from jaxtrain.models.hf.files import Checkpoint, read_block
from jaxtrain.models.hf.mapping import sources

MOE = ["mixtral", "qwen3_moe"]


@pytest.mark.parametrize("name", MOE)
def test_renormalising_is_what_makes_parity(name):
    """Mixtral renormalises its top-2 weights, this Qwen3-MoE (norm_topk_prob false) does
    not: flipping the switch on the same weights breaks parity, so routing is exercised."""
    directory, ids, want = fixture(name)
    cfg, model = from_pretrained(directory)
    assert cfg.moe.renormalize == (name == "mixtral")
    flipped = dataclasses.replace(cfg.moe, renormalize=not cfg.moe.renormalize)
    graph = abstract_graph(dataclasses.replace(cfg, moe=flipped))
    assert np.abs(forward(nnx.merge(graph, nnx.state(model)), ids) - want).max() > 1e-2


def _fused(name, tensors, layers=2, experts=4):
    """The fixture's tensors as transformers 5's modules hold them: each layer's experts
    in ``mlp.experts.gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F], Mixtral's
    ``block_sparse_moe`` named ``mlp``."""
    gate, up, down = (
        ("w1", "w3", "w2") if name == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    )
    out = {}
    for key, value in tensors.items():
        if ".experts." not in key:
            out[key.replace(".block_sparse_moe.", ".mlp.")] = value
    for i in range(layers):
        prefix = f"model.layers.{i}.{'block_sparse_moe' if name == 'mixtral' else 'mlp'}.experts"
        each = [
            {w: tensors[f"{prefix}.{j}.{w}.weight"] for w in (gate, up, down)}
            for j in range(experts)
        ]
        fused = f"model.layers.{i}.mlp.experts"
        out[f"{fused}.gate_up_proj"] = np.stack([np.concatenate([e[gate], e[up]]) for e in each])
        out[f"{fused}.down_proj"] = np.stack([e[down] for e in each])
    return out


@pytest.mark.parametrize("name", MOE)
def test_fused_expert_layout_imports(name, tmp_path):
    """A checkpoint of the tensors transformers 5's modules hold (which its
    from_pretrained loads too) imports to the same logits."""
    directory, ids, want = fixture(name)
    tensors = hf_tensors(directory)
    fused = _fused(name, tensors)
    assert len(fused) < len(tensors) and not any(".experts.0." in k for k in fused)
    save_file(fused, tmp_path / "model.safetensors")
    shutil.copy(directory / "config.json", tmp_path)
    _, model = from_pretrained(tmp_path)
    np.testing.assert_allclose(forward(model, ids), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_expert_blocks_are_read_from_their_own_tensors(fused, tmp_path):
    """A block that splits the layers, the experts and both matrix axes is read from
    just those experts' tensors, stored one per expert or fused."""
    directory = FIXTURES / "qwen3_moe"
    tensors = hf_tensors(directory)
    src = sources(config_from_hf(directory))[("blocks", "mlp", "w_gate")]
    if fused:
        save_file(_fused("qwen3_moe", tensors), tmp_path / "model.safetensors")
        directory, src = tmp_path, src.fallback
    index = (slice(1, 2), slice(1, 3), slice(8, 24), slice(0, 12))  # of [L, E, D, F]
    with Checkpoint(directory) as ckpt:
        block = read_block(ckpt, src, index, (2, 4, 32, 24), np.float32)
    name = "model.layers.1.mlp.experts.{}.gate_proj.weight"
    want = np.stack([tensors[name.format(j)].T[8:24, :12] for j in (1, 2)])[None]
    np.testing.assert_array_equal(block, want)


def test_config_mapping_round_trips():
    mixtral, qwen = read_config(FIXTURES / "mixtral"), read_config(FIXTURES / "qwen3_moe")
    m = config_from_hf(mixtral)
    assert (m.moe.num_experts, m.moe.experts_per_token, m.moe.expert_mlp_dim) == (4, 2, 48)
    assert m.moe.renormalize and m.mlp_dim == 48 and not m.qk_norm and not m.sliding_window
    assert (m.moe.capacity_factor, m.moe.z_weight, m.moe.balance_weight) == (0.0, 0.0, 0.001)
    q = config_from_hf(qwen)
    assert (q.moe.num_experts, q.moe.expert_mlp_dim, q.mlp_dim, q.head_dim) == (4, 24, 64, 16)
    assert q.qk_norm and not q.moe.renormalize
    # The Hub's spelling (num_experts; transformers 5 saves num_local_experts).
    hub = {k: v for k, v in qwen.items() if k != "num_local_experts"} | {"num_experts": 4}
    assert config_from_hf(hub) == q
    for cfg, theirs in ((m, mixtral), (q, qwen)):
        hf = config_to_hf(cfg)
        assert hf["architectures"] == theirs["architectures"]
        assert config_from_hf(hf) == cfg
    assert config_to_hf(q)["num_experts"] == 4 and config_to_hf(q)["norm_topk_prob"] is False
    # Mixtral's window: null is none, a number is kept; the aux-loss weight whatever
    # output_router_logits says.
    window = config_from_hf(mixtral | {"sliding_window": 5, "output_router_logits": True})
    assert window.sliding_window == 5 and config_to_hf(window)["sliding_window"] == 5
    assert config_to_hf(m)["sliding_window"] is None
    heavy = config_from_hf(qwen | {"router_aux_loss_coef": 0.02, "norm_topk_prob": True})
    assert heavy.moe.balance_weight == 0.02 and heavy.moe.renormalize
    assert config_to_hf(heavy)["router_aux_loss_coef"] == 0.02


def test_refusals_are_one_line_naming_the_key():
    mixtral, qwen = read_config(FIXTURES / "mixtral"), read_config(FIXTURES / "qwen3_moe")
    for bad, key in (
        (qwen | {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        (qwen | {"mlp_only_layers": [1]}, "mlp_only_layers"),
        (qwen | {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window"),
        (qwen | {"attention_bias": True}, "attention_bias"),
        (qwen | {"num_local_experts": 0}, "num_local_experts"),
        (mixtral | {"num_experts_per_tok": 5}, "num_experts_per_tok"),
        (mixtral | {"hidden_act": "gelu"}, "hidden_act"),
    ):
        with pytest.raises(UserError, match=f"config.json {key}:") as err:
            config_from_hf(bad)
        assert "\n" not in str(err.value)
    m = config_from_hf(mixtral)
    for moe, switches, key in (
        ({"shared_experts": 1}, {}, "model.moe.shared_experts"),
        ({"renormalize": False}, {}, "model.moe.renormalize"),
        ({}, {"qkv_bias": True}, "model.qkv_bias"),
        ({}, {"qk_norm": True, "sliding_window": 8}, "model.sliding_window"),
    ):
        bad = dataclasses.replace(m, moe=dataclasses.replace(m.moe, **moe), **switches)
        with pytest.raises(UserError, match=f"^{key}:.*no Hugging Face architecture") as err:
            config_to_hf(bad)
        assert "\n" not in str(err.value)


def test_checkpoint_fixes_the_experts_shape_not_their_training():
    """A run from a checkpoint may choose capacity and the loss weights (and mlp_dim,
    which experts do not use); the experts' number, width and routing must match."""
    directory = FIXTURES / "qwen3_moe"
    cfg = config_from_hf(directory)
    own = dataclasses.replace(cfg.moe, capacity_factor=1.25, balance_weight=0.1, z_weight=0.01)
    check_architecture(dataclasses.replace(cfg, moe=own, mlp_dim=128), directory)
    other = dataclasses.replace(cfg.moe, num_experts=8, renormalize=True)
    with pytest.raises(UserError) as err:
        check_architecture(dataclasses.replace(cfg, moe=other), directory)
    message = str(err.value)
    assert "\n" not in message and "capacity" not in message
    assert "model.moe.num_experts=4" in message and "model.moe.renormalize=false" in message
    dense = config.ModelConfig(
        **{
            k: getattr(cfg, k)
            for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads")
        }
    )
    with pytest.raises(UserError, match="model.moe.num_experts=4"):
        check_architecture(dense, directory)

"""Hugging Face ``config.json`` <-> :class:`~jaxtrain.config.ModelConfig`.

Covered architectures: ``LlamaForCausalLM`` (Llama 2, Llama 3, Llama 3.1 RoPE scaling),
``MistralForCausalLM``, ``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM`` map onto the
``llama`` family's switches, and the mixtures of experts ``MixtralForCausalLM`` and
``Qwen3MoeForCausalLM`` onto those and ``model.moe``; ``GPT2LMHeadModel`` onto ``gpt2``;
``BertForMaskedLM`` and ``RobertaForMaskedLM`` onto ``bert`` and ``roberta``;
``T5ForConditionalGeneration`` (v1.1 / FLAN-T5: gated GELU) onto ``t5``. Both the
transformers 4 (``rope_theta`` + ``rope_scaling``) and 5 (``rope_parameters``) spellings
are read. Anything these classes can express that jaxtrain does not compute (other RoPE
scalings, per-layer sliding windows, output biases on LLaMA, T5's ReLU feed-forward,
Qwen3-MoE's dense layers among the sparse ones) is refused with the key named.

The experts route as HF's do: dropless (``capacity_factor`` 0), Mixtral always
renormalising the top-k weights and Qwen3-MoE when ``norm_topk_prob``. HF's
``router_aux_loss_coef`` is ``balance_weight`` (whatever ``output_router_logits``, which
only says whether HF's forward adds the loss); HF has no router z-loss (``z_weight`` 0).
Settings HF applies in training only (attention dropout, Mixtral's router jitter) are
not read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxtrain.config import ModelConfig, MoEConfig, RopeScalingConfig
from jaxtrain.errors import UserError

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertForMaskedLM",
    "roberta": "RobertaForMaskedLM",
    "t5": "T5ForConditionalGeneration",
}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

# The fields that describe an architecture (all but max_seq_len, which is only a shape
# for learned position tables), compared when a run starts from a checkpoint.
ARCHITECTURE_FIELDS = (
    "family",
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "mlp_dim",
    "norm_eps",
    "tie_embeddings",
    "rope_theta",
    "rope_scaling",
    "qkv_bias",
    "qk_norm",
    "sliding_window",
    "moe",
    "type_vocab_size",
    "relative_buckets",
    "relative_max_distance",
)
# The fields of model.moe that describe the architecture (the rest are training settings).
MOE_ARCHITECTURE_FIELDS = (
    "num_experts",
    "experts_per_token",
    "expert_mlp_dim",
    "shared_experts",
    "renormalize",
)


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model directory.

    Raises:
        UserError: if the directory or its config.json is missing or not JSON.
    """
    file = Path(directory) / "config.json"
    if not file.is_file():
        raise UserError(f"{directory}: not a Hugging Face model directory (no config.json)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{file}: not valid JSON ({err.msg}, line {err.lineno})") from None


def _refuse(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"config.json {key}: {message}")


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScalingConfig]:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, RopeScalingConfig()
    _refuse(kind == "llama3", "rope_type", f"{kind!r} is not supported (default, llama3)")
    scaling = RopeScalingConfig(
        kind="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_len=int(
            params.get("original_max_position_embeddings", hf["max_position_embeddings"])
        ),
    )
    return theta, scaling


def _moe(hf: dict[str, Any], model_type: str) -> MoEConfig:
    """The experts of Mixtral and Qwen3-MoE (transformers' defaults for missing keys)."""
    if model_type == "mixtral":  # its intermediate_size is the experts' width
        key, width, renormalize = "num_local_experts", hf["intermediate_size"], True
        experts = hf.get(key, 8)
    else:  # transformers 5 saves Qwen3-MoE's num_experts as num_local_experts
        key = "num_experts" if "num_experts" in hf else "num_local_experts"
        width, renormalize = hf.get("moe_intermediate_size", 768), hf.get("norm_topk_prob", False)
        experts = hf.get(key, 128)
        step = hf.get("decoder_sparse_step", 1)
        _refuse(step == 1, "decoder_sparse_step", f"{step}: only every layer sparse (1) is mapped")
        dense = hf.get("mlp_only_layers") or []
        _refuse(not dense, "mlp_only_layers", f"{dense}: dense layers among the experts")
    _refuse(experts > 0, key, f"{experts}: must be positive")
    k = hf.get("num_experts_per_tok", 2 if model_type == "mixtral" else 8)
    _refuse(1 <= k <= experts, "num_experts_per_tok", f"{k}: must be between 1 and {experts}")
    return MoEConfig(
        num_experts=experts,
        experts_per_token=k,
        expert_mlp_dim=width,
        renormalize=bool(renormalize),
        balance_weight=float(hf.get("router_aux_loss_coef", 0.001)),
        z_weight=0.0,
    )


def _llama(hf: dict[str, Any], model_type: str) -> ModelConfig:
    _refuse(hf.get("hidden_act", "silu") == "silu", "hidden_act", "only silu (SwiGLU) is mapped")
    _refuse(not hf.get("mlp_bias", False), "mlp_bias", "MLP biases are not supported")
    if model_type == "qwen2":
        qkv_bias = True  # Qwen2 always has q/k/v biases and never an output bias
    else:
        _refuse(not hf.get("attention_bias", False), "attention_bias", "not supported")
        qkv_bias = False
    window = 0
    if model_type in ("mistral", "mixtral"):
        window = int(hf.get("sliding_window") or 0)
    elif model_type in ("qwen2", "qwen3", "qwen3_moe"):
        _refuse(
            not hf.get("use_sliding_window", False),
            "use_sliding_window",
            "per-layer sliding windows are not supported",
        )
    theta, scaling = _rope(hf)
    heads = hf["num_attention_heads"]
    return ModelConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or 0,
        mlp_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        sliding_window=window,
        moe=_moe(hf, model_type) if model_type in ("mixtral", "qwen3_moe") else MoEConfig(),
    )


def _gpt2(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    _refuse(act in _GELU_TANH, "activation_function", f"{act!r}: only {_GELU_TANH} are mapped")
    _refuse(hf.get("scale_attn_weights", True), "scale_attn_weights", "false is not supported")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        _refuse(not hf.get(key, False), key, "true is not supported")
    d_model = hf.get("n_embd", 768)
    return ModelConfig(
        family="gpt2",
        vocab_size=hf.get("vocab_size", 50257),
        d_model=d_model,
        n_layers=hf.get("n_layer", 12),
        n_heads=hf.get("n_head", 12),
        n_kv_heads=hf.get("n_head", 12),
        mlp_dim=hf.get("n_inner") or 4 * d_model,
        max_seq_len=hf.get("n_positions", 1024),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _bert(hf: dict[str, Any], model_type: str) -> ModelConfig:
    """BERT and RoBERTa; RoBERTa's ``max_position_embeddings`` counts the ``pad + 1``
    rows its positions skip, our ``max_seq_len`` does not."""
    act = hf.get("hidden_act", "gelu")
    _refuse(act == "gelu", "hidden_act", f"{act!r}: only the exact gelu is mapped")
    kind = hf.get("position_embedding_type", "absolute")
    _refuse(kind == "absolute", "position_embedding_type", f"{kind!r} is not supported")
    for key in ("is_decoder", "add_cross_attention"):
        _refuse(not hf.get(key, False), key, "true is not supported (an encoder only)")
    _refuse(
        hf.get("tie_word_embeddings", True),
        "tie_word_embeddings",
        "false is not supported: the MLM decoder is the word embedding",
    )
    heads = hf["num_attention_heads"]
    pad = hf.get("pad_token_id")
    pad = (1 if model_type == "roberta" else 0) if pad is None else pad
    positions = hf.get("max_position_embeddings", 512)
    return ModelConfig(
        family=model_type,
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=heads,
        mlp_dim=hf["intermediate_size"],
        max_seq_len=positions - (pad + 1 if model_type == "roberta" else 0),
        norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        tie_embeddings=True,
        type_vocab_size=hf.get("type_vocab_size", 2),
        pad_id=pad,
    )


def _t5(hf: dict[str, Any]) -> ModelConfig:
    """T5 v1.1. The LM head is untied and unscaled, or (original T5) the embedding with
    the output scaled by ``d_model^-0.5``; transformers 5 spells the scaling
    ``scale_decoder_outputs``, 4 implies it with ``tie_word_embeddings``."""
    proj = hf.get("feed_forward_proj", "relu")
    act = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
    _refuse(
        proj.startswith("gated-") and act in _GELU_TANH,
        "feed_forward_proj",
        f"{proj!r}: only the gated GELU of T5 v1.1 / FLAN-T5 is mapped",
    )
    layers = hf.get("num_layers", 6)
    decoder_layers = hf.get("num_decoder_layers") or layers
    _refuse(decoder_layers == layers, "num_decoder_layers", "must equal num_layers")
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    heads = hf.get("num_heads", 8)
    pad = hf.get("pad_token_id")
    pad = 0 if pad is None else pad
    start = hf.get("decoder_start_token_id")
    return ModelConfig(
        family="t5",
        vocab_size=hf.get("vocab_size", 32128),
        d_model=hf.get("d_model", 512),
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=hf.get("d_kv", 64),
        mlp_dim=hf.get("d_ff", 2048),
        max_seq_len=hf.get("n_positions", 512),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        tie_embeddings=bool(scaled),
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        pad_id=pad,
        decoder_start_id=pad if start is None else start,
    )


def config_from_hf(hf: dict[str, Any] | str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of an HF ``config.json`` (a dict, or the model directory).

    Parameters are float32 (``model.param_dtype``) whatever the checkpoint's dtype.

    Raises:
        UserError: for an unsupported model type or setting, naming the config.json key.
    """
    if not isinstance(hf, dict):
        hf = read_config(hf)
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"config.json model_type: {model_type!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    if model_type in ("bert", "roberta"):
        return _bert(hf, model_type)
    if model_type == "t5":
        return _t5(hf)
    return _gpt2(hf) if model_type == "gpt2" else _llama(hf, model_type)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"{key}: {message}; no Hugging Face architecture jaxtrain writes has it")


def llama_type(cfg: ModelConfig) -> str:
    """The HF model type that expresses a llama-family config's switches.

    Raises:
        UserError: if none does, naming the ``model.*`` key.
    """
    if cfg.moe.num_experts:
        shared = cfg.moe.shared_experts
        _check(not shared, "model.moe.shared_experts", f"{shared} (experts every token sees)")
        _check(not cfg.qkv_bias, "model.qkv_bias", "with model.moe")
        if cfg.qk_norm:
            _check(not cfg.sliding_window, "model.sliding_window", "with model.qk_norm")
            return "qwen3_moe"
        _check(cfg.moe.renormalize, "model.moe.renormalize", "false without model.qk_norm")
        return "mixtral"
    if cfg.qk_norm:
        _check(not cfg.qkv_bias, "model.qkv_bias", "with model.qk_norm")
        _check(not cfg.sliding_window, "model.sliding_window", "with model.qk_norm")
        return "qwen3"
    if cfg.qkv_bias:
        _check(not cfg.sliding_window, "model.sliding_window", "with model.qkv_bias")
        _check(cfg.head_dim * cfg.n_heads == cfg.d_model, "model.head_dim", "!= d_model/n_heads")
        return "qwen2"
    if cfg.sliding_window:
        return "mistral"
    _check(cfg.d_model % cfg.n_heads == 0, "model.n_heads", "not dividing d_model")
    return "llama"


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict of ``cfg`` (the inverse of :func:`config_from_hf`).

    Of ``model.moe``, ``capacity_factor`` and ``z_weight`` are training settings that
    no HF key holds; they are not written (HF's experts are dropless).

    Raises:
        UserError: if no HF architecture expresses ``cfg`` (e.g. GPT-2 with grouped-query
            attention).
    """
    dtype = {"dtype": cfg.param_dtype}
    if cfg.family in ("bert", "roberta", "t5"):
        _check(cfg.n_kv_heads == cfg.n_heads, "model.n_kv_heads", f"!= n_heads in {cfg.family}")
    if cfg.family in ("bert", "roberta"):
        _check(cfg.head_dim * cfg.n_heads == cfg.d_model, "model.head_dim", "!= d_model/n_heads")
        _check(cfg.tie_embeddings, "model.tie_embeddings", "false (an untied MLM decoder)")
        offset = cfg.pad_id + 1 if cfg.family == "roberta" else 0
        return {
            "architectures": [ARCHITECTURES[cfg.family]],
            "model_type": cfg.family,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "intermediate_size": cfg.mlp_dim,
            "hidden_act": "gelu",
            "max_position_embeddings": cfg.max_seq_len + offset,
            "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.norm_eps,
            "pad_token_id": cfg.pad_id,
            "tie_word_embeddings": True,
            **dtype,
        }
    if cfg.family == "t5":
        return {
            "architectures": [ARCHITECTURES["t5"]],
            "model_type": "t5",
            "is_encoder_decoder": True,
            "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model,
            "d_kv": cfg.head_dim,
            "d_ff": cfg.mlp_dim,
            "num_layers": cfg.n_layers,
            "num_decoder_layers": cfg.n_layers,
            "num_heads": cfg.n_heads,
            "relative_attention_num_buckets": cfg.relative_buckets,
            "relative_attention_max_distance": cfg.relative_max_distance,
            "layer_norm_epsilon": cfg.norm_eps,
            "feed_forward_proj": "gated-gelu",
            "n_positions": cfg.max_seq_len,
            "pad_token_id": cfg.pad_id,
            "decoder_start_token_id": cfg.decoder_start_id,
            # v1.1 (untied, unscaled) or the original T5's scaled, tied head.
            "tie_word_embeddings": cfg.tie_embeddings,
            "scale_decoder_outputs": cfg.tie_embeddings,
            **dtype,
        }
    if cfg.family == "gpt2":
        _check(cfg.n_kv_heads == cfg.n_heads, "model.n_kv_heads", "!= n_heads in GPT-2")
        _check(cfg.head_dim * cfg.n_heads == cfg.d_model, "model.head_dim", "!= d_model/n_heads")
        return {
            "architectures": [ARCHITECTURES["gpt2"]],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.mlp_dim,
            "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": cfg.tie_embeddings,
            **dtype,
        }
    _check(cfg.family == "llama", "model.family", f"{cfg.family!r}")
    model_type = llama_type(cfg)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling.kind == "llama3":
        scaling = dataclasses.asdict(cfg.rope_scaling)
        rope |= {
            "rope_type": "llama3",
            "factor": scaling["factor"],
            "low_freq_factor": scaling["low_freq_factor"],
            "high_freq_factor": scaling["high_freq_factor"],
            "original_max_position_embeddings": scaling["original_max_len"],
        }
    hf = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        **dtype,
    }
    if model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if model_type in ("qwen2", "qwen3", "qwen3_moe"):
        hf["use_sliding_window"] = False
    if model_type in ("llama", "qwen3", "qwen3_moe"):
        hf["attention_bias"] = False
    if model_type in ("mixtral", "qwen3_moe"):
        moe = cfg.moe
        hf |= {
            "num_experts_per_tok": moe.experts_per_token,
            "router_aux_loss_coef": moe.balance_weight,
            "output_router_logits": False,
        }
    if model_type == "mixtral":  # its intermediate_size is the experts' width
        hf |= {
            "intermediate_size": moe.expert_mlp_dim,
            "num_local_experts": moe.num_experts,
            "sliding_window": cfg.sliding_window or None,
        }
    if model_type == "qwen3_moe":  # intermediate_size: its (here unused) dense layers' width
        hf |= {
            "moe_intermediate_size": moe.expert_mlp_dim,
            "num_experts": moe.num_experts,
            "norm_topk_prob": moe.renormalize,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
    if model_type == "qwen2":
        del hf["head_dim"]  # Qwen2 derives it from hidden_size / num_attention_heads
    return hf

"""Where each jaxtrain parameter lives in a Hugging Face checkpoint, and in what layout.

A :class:`Source` says how to build one of our parameters from HF tensors of shape
``hf``: take the ``part`` of each, view it in ``view`` shape, transpose it by ``perm``, and
(for block parameters) stack the per-layer results along the leading ``layers`` axis
(and, for experts stored one tensor each, the per-expert results along the next).
The same description read backwards gives the export. Our layouts: wq [D, N, H],
wk and wv [D, K, H], wo [N, H, D], MLP weights [D, F] and [F, D], embedding [V, D],
LM head [D, V], router [D, E], experts' weights [E, D, F] and [E, F, D]; HF's
``nn.Linear`` stores [out, in] and GPT-2's ``Conv1D`` [in, out].

Dimensions: D model width, N heads, K kv heads, H head dim, F MLP (or expert) width,
V vocabulary, P positions, T token types, R relative-position buckets, E experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jaxtrain.config import ModelConfig
from jaxtrain.models.hf.config import llama_type

Path = tuple[str, ...]  # a parameter's keys in the model's pure-dict parameter tree


@dataclasses.dataclass(frozen=True)
class Source:
    """One of our parameters as HF tensors.

    Attributes:
        names: the HF tensor, or one per layer (stacked on a leading axis) if ``layered``,
            or one per layer and expert (layer-major, stacked on two) if ``experts``.
        hf: the shape of each HF tensor.
        view: the HF tensor (or its ``part``) seen in this shape, a split of its axes
            (None: as stored).
        perm: then transposed by this permutation into our layout (None: as is).
        part: ``(axis, start, stop)`` when only that range of the HF tensor is ours
            (GPT-2 fuses q, k and v into one ``c_attn``).
        layered: ``names`` has one tensor per layer.
        experts: with ``layered``, the number of experts when ``names`` has one tensor per
            layer and expert (0: one per layer).
        fallback: read this instead when the checkpoint lacks ``names``: a T5 that
            transformers 5 built ties its LM head to ``shared`` unscaled; experts may
            also be stored fused, all of a layer's in one tensor.
    """

    names: tuple[str, ...]
    hf: tuple[int, ...]
    view: tuple[int, ...] | None = None
    perm: tuple[int, ...] | None = None
    part: tuple[int, int, int] | None = None
    layered: bool = False
    experts: int = 0
    fallback: Source | None = None

    @property
    def stacked(self) -> int:
        """How many leading axes of ours stack the tensors of ``names`` (0, 1 or 2)."""
        return 0 if not self.layered else 2 if self.experts else 1

    @property
    def part_shape(self) -> tuple[int, ...]:
        """The shape of the HF tensor's part that is ours (the whole, without a part)."""
        if self.part is None:
            return self.hf
        axis, start, stop = self.part
        return (*self.hf[:axis], stop - start, *self.hf[axis + 1 :])

    @property
    def view_shape(self) -> tuple[int, ...]:
        return self.part_shape if self.view is None else self.view

    @property
    def axes(self) -> tuple[int, ...]:
        """The permutation into our layout (the identity when there is none)."""
        return tuple(range(len(self.view_shape))) if self.perm is None else self.perm


def _layers(cfg: ModelConfig, template: str) -> tuple[str, ...]:
    return tuple(template.format(i=i) for i in range(cfg.n_layers))


def moe_sources(cfg: ModelConfig) -> dict[Path, Source]:
    """The experts of MixtralForCausalLM and Qwen3MoeForCausalLM: each layer's router
    ``gate.weight`` [E, D] and each expert's ``nn.Linear`` weights, a tensor per layer and
    expert, as the Hub's checkpoints and transformers' ``save_pretrained`` store them
    (Mixtral's ``block_sparse_moe.experts.{j}.w1`` gate, ``w3`` up, ``w2`` down; Qwen3-MoE's
    ``mlp.experts.{j}.gate_proj``, ``up_proj``, ``down_proj``). Failing those, the tensors
    of transformers 5's modules are read: Mixtral's router as ``mlp.gate.weight``, the
    fused ``mlp.experts.gate_up_proj`` [E, 2F, D] (the gate's F rows first) and
    ``mlp.experts.down_proj`` [E, D, F]."""
    n, d, e, f = cfg.n_layers, cfg.d_model, cfg.moe.num_experts, cfg.moe.expert_mlp_dim
    mixtral = llama_type(cfg) == "mixtral"
    block = "block_sparse_moe" if mixtral else "mlp"
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")

    def layer(name: str, hf: tuple[int, ...], perm, part=None, fallback=None) -> Source:
        names = _layers(cfg, f"model.layers.{{i}}.{name}")
        return Source(names, hf, None, perm, part, layered=True, fallback=fallback)

    def expert(name: str, hf: tuple[int, ...], fused: Source) -> Source:
        names = tuple(
            f"model.layers.{i}.{block}.experts.{j}.{name}.weight"
            for i in range(n)
            for j in range(e)
        )
        return Source(names, hf, perm=(1, 0), layered=True, experts=e, fallback=fused)

    router = layer("mlp.gate.weight", (e, d), (1, 0))
    if mixtral:
        router = layer(f"{block}.gate.weight", (e, d), (1, 0), fallback=router)
    to_edf = (0, 2, 1)  # [E, F, D] -> [E, D, F] and [E, D, F] -> [E, F, D]
    gate_up = "mlp.experts.gate_up_proj", (e, 2 * f, d), to_edf
    return {
        ("blocks", "mlp", "router"): router,
        ("blocks", "mlp", "w_gate"): expert(gate, (f, d), layer(*gate_up, (1, 0, f))),
        ("blocks", "mlp", "w_up"): expert(up, (f, d), layer(*gate_up, (1, f, 2 * f))),
        ("blocks", "mlp", "w_down"): expert(
            down, (d, f), layer("mlp.experts.down_proj", (e, d, f), to_edf)
        ),
    }


def llama_sources(cfg: ModelConfig) -> dict[Path, Source]:
    """LlamaForCausalLM and its relatives (Mistral, Qwen2, Qwen3; with experts, Mixtral
    and Qwen3-MoE: :func:`moe_sources`)."""
    d, n, k, h, f, v = (
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.mlp_dim,
        cfg.vocab_size,
    )

    def layer(name: str, hf: tuple[int, ...], view=None, perm=None) -> Source:
        names = _layers(cfg, f"model.layers.{{i}}.{name}")
        return Source(names, hf, view, perm, layered=True)

    to_dnh = (2, 0, 1)  # [N, H, D] -> [D, N, H]
    out = {
        ("embed",): Source(("model.embed_tokens.weight",), (v, d)),
        ("blocks", "attn_norm", "scale"): layer("input_layernorm.weight", (d,)),
        ("blocks", "attn", "wq"): layer("self_attn.q_proj.weight", (n * h, d), (n, h, d), to_dnh),
        ("blocks", "attn", "wk"): layer("self_attn.k_proj.weight", (k * h, d), (k, h, d), to_dnh),
        ("blocks", "attn", "wv"): layer("self_attn.v_proj.weight", (k * h, d), (k, h, d), to_dnh),
        ("blocks", "attn", "wo"): layer(
            "self_attn.o_proj.weight", (d, n * h), (d, n, h), (1, 2, 0)
        ),
        ("blocks", "mlp_norm", "scale"): layer("post_attention_layernorm.weight", (d,)),
    }
    if cfg.moe.num_experts:
        out |= moe_sources(cfg)
    else:
        out[("blocks", "mlp", "w_gate")] = layer("mlp.gate_proj.weight", (f, d), None, (1, 0))
        out[("blocks", "mlp", "w_up")] = layer("mlp.up_proj.weight", (f, d), None, (1, 0))
        out[("blocks", "mlp", "w_down")] = layer("mlp.down_proj.weight", (d, f), None, (1, 0))
    out[("final_norm", "scale")] = Source(("model.norm.weight",), (d,))
    if cfg.qkv_bias:
        out[("blocks", "attn", "bq")] = layer("self_attn.q_proj.bias", (n * h,), (n, h))
        out[("blocks", "attn", "bk")] = layer("self_attn.k_proj.bias", (k * h,), (k, h))
        out[("blocks", "attn", "bv")] = layer("self_attn.v_proj.bias", (k * h,), (k, h))
    if cfg.qk_norm:
        out[("blocks", "attn", "q_norm", "scale")] = layer("self_attn.q_norm.weight", (h,))
        out[("blocks", "attn", "k_norm", "scale")] = layer("self_attn.k_norm.weight", (h,))
    if not cfg.tie_embeddings:
        out[("lm_head",)] = Source(("lm_head.weight",), (v, d), perm=(1, 0))
    return out


def gpt2_sources(cfg: ModelConfig) -> dict[Path, Source]:
    """GPT2LMHeadModel. ``Conv1D`` weights are already [in, out]; q, k and v are the
    three thirds of ``c_attn``'s output axis."""
    d, n, h, f, v, p = (
        cfg.d_model,
        cfg.n_heads,
        cfg.head_dim,
        cfg.mlp_dim,
        cfg.vocab_size,
        cfg.max_seq_len,
    )

    def layer(name: str, hf: tuple[int, ...], view=None, part=None) -> Source:
        names = _layers(cfg, f"transformer.h.{{i}}.{name}")
        return Source(names, hf, view, None, part, layered=True)

    out = {
        ("embed",): Source(("transformer.wte.weight",), (v, d)),
        ("pos_embed",): Source(("transformer.wpe.weight",), (p, d)),
        ("final_norm", "scale"): Source(("transformer.ln_f.weight",), (d,)),
        ("final_norm", "bias"): Source(("transformer.ln_f.bias",), (d,)),
        ("blocks", "attn", "wo"): layer("attn.c_proj.weight", (n * h, d), (n, h, d)),
        ("blocks", "attn", "bo"): layer("attn.c_proj.bias", (d,)),
        ("blocks", "mlp", "w_in"): layer("mlp.c_fc.weight", (d, f)),
        ("blocks", "mlp", "b_in"): layer("mlp.c_fc.bias", (f,)),
        ("blocks", "mlp", "w_out"): layer("mlp.c_proj.weight", (f, d)),
        ("blocks", "mlp", "b_out"): layer("mlp.c_proj.bias", (d,)),
    }
    for norm, hf_norm in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        out[("blocks", norm, "scale")] = layer(f"{hf_norm}.weight", (d,))
        out[("blocks", norm, "bias")] = layer(f"{hf_norm}.bias", (d,))
    qkv = 3 * n * h
    for third, name in enumerate("qkv"):
        span = (third * n * h, (third + 1) * n * h)
        out[("blocks", "attn", f"w{name}")] = layer(
            "attn.c_attn.weight", (d, qkv), (d, n, h), (1, *span)
        )
        out[("blocks", "attn", f"b{name}")] = layer("attn.c_attn.bias", (qkv,), (n, h), (0, *span))
    if not cfg.tie_embeddings:
        out[("lm_head",)] = Source(("lm_head.weight",), (v, d), perm=(1, 0))
    return out


def _attention(
    layer: Callable[..., Source], names: tuple[str, str, str, str], n: int, h: int, d: int
) -> dict[str, Source]:
    """wq, wk, wv and wo (N heads of H) from the ``nn.Linear`` weights named q, k, v, o."""
    q, k, v, o = names
    to_dnh = (2, 0, 1)  # [N, H, D] -> [D, N, H]
    return {
        "wq": layer(q, (n * h, d), (n, h, d), to_dnh),
        "wk": layer(k, (n * h, d), (n, h, d), to_dnh),
        "wv": layer(v, (n * h, d), (n, h, d), to_dnh),
        "wo": layer(o, (d, n * h), (d, n, h), (1, 2, 0)),
    }


def bert_sources(cfg: ModelConfig) -> dict[Path, Source]:
    """BertForMaskedLM and RobertaForMaskedLM: the encoder under ``bert.`` or
    ``roberta.``; the MLM head's transform and bias under ``cls.predictions.`` or
    ``lm_head.`` (its decoder weight is the word embedding)."""
    d, n, h, f, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    base = cfg.family  # "bert" or "roberta"

    def layer(name: str, hf: tuple[int, ...], view=None, perm=None) -> Source:
        names = _layers(cfg, f"{base}.encoder.layer.{{i}}.{name}")
        return Source(names, hf, view, perm, layered=True)

    rows = cfg.max_seq_len + (cfg.pad_id + 1 if base == "roberta" else 0)
    emb = f"{base}.embeddings."
    out = {
        ("embed",): Source((f"{emb}word_embeddings.weight",), (v, d)),
        ("pos_embed",): Source((f"{emb}position_embeddings.weight",), (rows, d)),
        ("type_embed",): Source((f"{emb}token_type_embeddings.weight",), (cfg.type_vocab_size, d)),
        ("embed_norm", "scale"): Source((f"{emb}LayerNorm.weight",), (d,)),
        ("embed_norm", "bias"): Source((f"{emb}LayerNorm.bias",), (d,)),
    }
    qkv = (f"attention.self.{x}.weight" for x in ("query", "key", "value"))
    attn = _attention(layer, (*qkv, "attention.output.dense.weight"), n, h, d)
    for name, src in attn.items():
        out[("blocks", "attn", name)] = src
    for name, hf_name in (("bq", "query"), ("bk", "key"), ("bv", "value")):
        out[("blocks", "attn", name)] = layer(f"attention.self.{hf_name}.bias", (n * h,), (n, h))
    out[("blocks", "attn", "bo")] = layer("attention.output.dense.bias", (d,))
    out[("blocks", "mlp", "w_in")] = layer("intermediate.dense.weight", (f, d), None, (1, 0))
    out[("blocks", "mlp", "b_in")] = layer("intermediate.dense.bias", (f,))
    out[("blocks", "mlp", "w_out")] = layer("output.dense.weight", (d, f), None, (1, 0))
    out[("blocks", "mlp", "b_out")] = layer("output.dense.bias", (d,))
    for norm, hf_norm in (
        ("attn_norm", "attention.output.LayerNorm"),
        ("mlp_norm", "output.LayerNorm"),
    ):
        out[("blocks", norm, "scale")] = layer(f"{hf_norm}.weight", (d,))
        out[("blocks", norm, "bias")] = layer(f"{hf_norm}.bias", (d,))
    head, norm = ("cls.predictions.transform.", "LayerNorm")
    if base == "roberta":
        head, norm = "lm_head.", "layer_norm"
    out[("head_w",)] = Source((f"{head}dense.weight",), (d, d), perm=(1, 0))
    out[("head_b",)] = Source((f"{head}dense.bias",), (d,))
    out[("head_norm", "scale")] = Source((f"{head}{norm}.weight",), (d,))
    out[("head_norm", "bias")] = Source((f"{head}{norm}.bias",), (d,))
    bias = "lm_head.bias" if base == "roberta" else "cls.predictions.bias"
    out[("out_bias",)] = Source((bias,), (v,))
    return out


def t5_sources(cfg: ModelConfig) -> dict[Path, Source]:
    """T5ForConditionalGeneration. Each stack's relative position bias is its first
    layer's; the encoder's blocks are ``layer.0`` attention and ``layer.1`` feed-forward,
    the decoder's ``layer.0`` self-, ``layer.1`` cross-attention, ``layer.2`` feed-forward."""
    d, n, h, f, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    out: dict[Path, Source] = {("embed",): Source(("shared.weight",), (v, d))}
    stacks = {
        "encoder": ("attn", "mlp"),
        "decoder": ("self_attn", "cross_attn", "mlp"),
    }
    for stack, sublayers in stacks.items():

        def layer(name: str, hf: tuple[int, ...], view=None, perm=None, stack=stack) -> Source:
            return Source(_layers(cfg, f"{stack}.block.{{i}}.{name}"), hf, view, perm, layered=True)

        first = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out[(f"{stack}_bias",)] = Source((first,), (cfg.relative_buckets, n))
        out[(f"{stack}_norm", "scale")] = Source((f"{stack}.final_layer_norm.weight",), (d,))
        for index, ours in enumerate(sublayers):
            sub = f"layer.{index}."
            out[(stack, f"{ours}_norm", "scale")] = layer(f"{sub}layer_norm.weight", (d,))
            if ours == "mlp":
                ff = f"{sub}DenseReluDense."
                out[(stack, "mlp", "w_gate")] = layer(f"{ff}wi_0.weight", (f, d), None, (1, 0))
                out[(stack, "mlp", "w_up")] = layer(f"{ff}wi_1.weight", (f, d), None, (1, 0))
                out[(stack, "mlp", "w_down")] = layer(f"{ff}wo.weight", (d, f), None, (1, 0))
                continue
            theirs = f"{sub}{'EncDecAttention' if ours == 'cross_attn' else 'SelfAttention'}."
            names = tuple(f"{theirs}{x}.weight" for x in "qkvo")
            for name, src in _attention(layer, names, n, h, d).items():
                out[(stack, ours, name)] = src
    if not cfg.tie_embeddings:
        shared = Source(("shared.weight",), (v, d), perm=(1, 0))
        out[("lm_head",)] = Source(("lm_head.weight",), (v, d), perm=(1, 0), fallback=shared)
    return out


SOURCES = {
    "llama": llama_sources,
    "gpt2": gpt2_sources,
    "bert": bert_sources,
    "roberta": bert_sources,
    "t5": t5_sources,
}

# HF tensors that are buffers, or heads and tables that no model of ours has (BERT's
# pooler and next-sentence head, T5's unused cross-attention bias); never parameters.
IGNORED_SUFFIXES = (
    ".attn.bias",
    ".attn.masked_bias",
    ".rotary_emb.inv_freq",
    "embeddings.position_ids",
    ".pooler.dense.weight",
    ".pooler.dense.bias",
    "cls.seq_relationship.weight",
    "cls.seq_relationship.bias",
    "EncDecAttention.relative_attention_bias.weight",
)


def tied_copies(cfg: ModelConfig) -> set[str]:
    """HF tensors that are copies of a tied parameter of ours, ignored when saved."""
    if cfg.family == "bert":
        return {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    if cfg.family == "roberta":
        return {"lm_head.decoder.weight", "lm_head.decoder.bias"}
    copies = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if cfg.family == "t5":
        copies |= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    return copies


def sources(cfg: ModelConfig) -> dict[Path, Source]:
    """Every parameter of a ``cfg`` model and where it lives in an HF checkpoint."""
    return SOURCES[cfg.family](cfg)

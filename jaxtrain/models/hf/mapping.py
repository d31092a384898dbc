"""Where each jaxtrain parameter lives in a Hugging Face checkpoint, and in what layout.

A :class:`Source` says how to build one of our parameters from HF tensors of shape
``hf``: take the ``part`` of each, view it in ``view`` shape, transpose it by ``perm``, and
(for block parameters) stack the per-layer results along the leading ``layers`` axis.
The same description read backwards gives the export. Our layouts: wq [D, N, H],
wk and wv [D, K, H], wo [N, H, D], MLP weights [D, F] and [F, D], embedding [V, D],
LM head [D, V]; HF's ``nn.Linear`` stores [out, in] and GPT-2's ``Conv1D`` [in, out].

Dimensions: D model width, N heads, K kv heads, H head dim, F MLP width, V vocabulary,
P positions.
"""

from __future__ import annotations

import dataclasses

from jaxtrain.config import ModelConfig

Path = tuple[str, ...]  # a parameter's keys in the model's pure-dict parameter tree


@dataclasses.dataclass(frozen=True)
class Source:
    """One of our parameters as HF tensors.

    Attributes:
        names: the HF tensor, or one per layer (stacked on a leading axis) if ``layered``.
        hf: the shape of each HF tensor.
        view: the HF tensor (or its ``part``) seen in this shape, a split of its axes
            (None: as stored).
        perm: then transposed by this permutation into our layout (None: as is).
        part: ``(axis, start, stop)`` when only that range of the HF tensor is ours
            (GPT-2 fuses q, k and v into one ``c_attn``).
        layered: ``names`` has one tensor per layer.
    """

    names: tuple[str, ...]
    hf: tuple[int, ...]
    view: tuple[int, ...] | None = None
    perm: tuple[int, ...] | None = None
    part: tuple[int, int, int] | None = None
    layered: bool = False

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


def llama_sources(cfg: ModelConfig) -> dict[Path, Source]:
    """LlamaForCausalLM and its relatives (Mistral, Qwen2, Qwen3)."""
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
        ("blocks", "mlp", "w_gate"): layer("mlp.gate_proj.weight", (f, d), None, (1, 0)),
        ("blocks", "mlp", "w_up"): layer("mlp.up_proj.weight", (f, d), None, (1, 0)),
        ("blocks", "mlp", "w_down"): layer("mlp.down_proj.weight", (d, f), None, (1, 0)),
        ("final_norm", "scale"): Source(("model.norm.weight",), (d,)),
    }
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


SOURCES = {"llama": llama_sources, "gpt2": gpt2_sources}

# HF tensors that are buffers or tied copies, never parameters of ours.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def sources(cfg: ModelConfig) -> dict[Path, Source]:
    """Every parameter of a ``cfg`` model and where it lives in an HF checkpoint."""
    return SOURCES[cfg.family](cfg)

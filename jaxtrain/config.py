"""Typed, frozen run configuration: YAML in, dotted ``--set`` overrides, one-line errors.

A config is a tree of frozen dataclasses (``model``, ``mesh``, ``optim``, ``data``,
``train``, ``checkpoint``, ``run``). The defaults are the tiny CPU model that
``jaxtrain train`` trains with no arguments; ``configs/tiny.yaml`` spells the same values
out. Every field is checked on load: unknown keys, wrong types and impossible
combinations raise :class:`~jaxtrain.errors.UserError` with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from jaxtrain.config_file import DuplicateKey, parse_yaml, read_config
from jaxtrain.errors import UserError, quote

REMAT_POLICIES = (  # = models.remat.NAMES
    "none",
    "full",
    "dots_saveable",
    "save_qkvo_proj",
    "save_dots_except_mlp_in",
    "offload_dots",
)
# float16 compute needs loss scaling (its range underflows small gradients:
# train.loss_scale); bfloat16 has float32's range and needs none. Parameters (the
# optimizer's master copy) are float32 or bfloat16, never float16.
DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
LOSS_SCALES = ("auto", "dynamic", "none")
OFFLOADS = ("none", "opt_state", "opt_state+params")  # what lives in host memory between steps
# JAX runs with 32-bit integers (x64 off): the step counter, token ids, positions and
# shape arithmetic inside the program are int32, so every integer setting must fit.
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
PRESETS = ("dp", "fsdp", "fsdp_tp", "zero1")
NONFINITE_ACTIONS = ("stop", "skip")
GRAD_ACCUMULATIONS = ("sharded", "local")
FP8_FAMILIES = ("llama", "gpt2")  # the families whose projections can compute in float8
GRAD_COMM_DTYPES = ("float32", "bfloat16", "fp8")  # what gradients cross devices in
ATTENTION_IMPLS = ("auto", "xla", "chunked", "pallas", "cudnn")  # = kernels.IMPLS
CONTEXT_PARALLEL = ("ring", "all_gather")  # = sharding.context.MODES
CONTEXT_FAMILIES = ("llama", "gpt2")  # causal decoders: context parallelism applies
PIPELINE_FAMILIES = ("llama", "gpt2")  # one stack of decoder blocks: pipelining applies


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"{key}: {message}")


ROPE_SCALINGS = ("none", "llama3")
LLAMA_SWITCHES = ("qkv_bias", "qk_norm", "sliding_window")
OBJECTIVES = ("causal_lm", "mlm", "span_corruption")
# The objective each family trains with: decoders predict the next token, encoders the
# masked ones (BERT), encoder-decoders the corrupted spans (T5).
FAMILY_OBJECTIVES = {
    "llama": "causal_lm",
    "gpt2": "causal_lm",
    "bert": "mlm",
    "roberta": "mlm",
    "t5": "span_corruption",
}


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling. ``kind: llama3`` is Llama 3.1's: wavelengths longer than
    ``original_max_len / low_freq_factor`` are stretched by ``factor``, those shorter than
    ``original_max_len / high_freq_factor`` are kept, and the band between is blended."""

    kind: str = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self) -> None:
        key = "model.rope_scaling"
        _check(self.kind in ROPE_SCALINGS, f"{key}.kind", f"must be one of {ROPE_SCALINGS}")
        _check(self.factor > 0, f"{key}.factor", "must be positive")
        _check(self.low_freq_factor > 0, f"{key}.low_freq_factor", "must be positive")
        _check(
            self.high_freq_factor > self.low_freq_factor,
            f"{key}.high_freq_factor",
            f"must exceed {key}.low_freq_factor={self.low_freq_factor}",
        )
        _check(self.original_max_len > 0, f"{key}.original_max_len", "must be positive")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts feed-forward in every block (``models/moe.py``), llama family.

    ``num_experts`` 0 keeps the dense MLP. Each token goes to ``experts_per_token`` of
    them, picked by a softmax router, their weights renormalised to sum to 1 when
    ``renormalize`` (Mixtral; Qwen3-MoE's ``norm_topk_prob``). ``expert_mlp_dim`` is each
    expert's SwiGLU width (0: ``model.mlp_dim``); ``shared_experts`` of that width see
    every token (DeepSeekMoE). ``capacity_factor`` 0 is dropless; above 0 each expert
    takes at most ``capacity_factor x tokens x experts_per_token / num_experts`` of a
    device's tokens and drops the rest (GShard). The training loss adds
    ``balance_weight`` x the load-balancing loss (Switch/Mixtral) and ``z_weight`` x the
    router z-loss (ST-MoE), each averaged over the layers.
    """

    num_experts: int = 0
    experts_per_token: int = 2
    expert_mlp_dim: int = 0
    shared_experts: int = 0
    capacity_factor: float = 0.0
    renormalize: bool = True
    balance_weight: float = 0.01
    z_weight: float = 0.001

    def __post_init__(self) -> None:
        key = "model.moe"
        _check(self.num_experts >= 0, f"{key}.num_experts", "must be >= 0 (0: a dense MLP)")
        _check(
            1 <= self.experts_per_token <= (self.num_experts or self.experts_per_token),
            f"{key}.experts_per_token",
            f"must be between 1 and model.moe.num_experts={self.num_experts}",
        )
        _check(self.expert_mlp_dim >= 0, f"{key}.expert_mlp_dim", "must be >= 0 (0: mlp_dim)")
        _check(self.shared_experts >= 0, f"{key}.shared_experts", "must be >= 0")
        _check(self.capacity_factor >= 0, f"{key}.capacity_factor", "must be >= 0 (0: dropless)")
        for name in ("balance_weight", "z_weight"):
            _check(getattr(self, name) >= 0, f"{key}.{name}", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Transformer of one ``family``.

    ``llama`` is the LLaMA family (RMSNorm, RoPE, SwiGLU, grouped-query attention); its
    switches give Qwen2 (``qkv_bias``), Qwen3 (``qk_norm``, ``head_dim``), Mistral
    (``sliding_window``) and Llama 3.1 (``rope_scaling``). ``gpt2`` is GPT-2 (LayerNorm,
    GELU MLP, learned positions, biases). ``bert`` and ``roberta`` are the post-LN
    encoders with an MLM head (``type_vocab_size`` token types; RoBERTa's positions start
    after ``pad_id``). ``t5`` is the T5 v1.1 encoder-decoder (``n_layers`` each; relative
    position buckets); with ``tie_embeddings`` the LM head is the scaled embedding of the
    original T5. ``init_from: hf:/path`` starts a fresh run from a Hugging Face checkpoint
    directory. ``remat`` names what each block saves for the backward pass
    (``models/remat.py``); ``remat_fraction`` applies it to that share of the layers, the
    first ones, and the rest save everything.

    Special token ids (for the byte tokenizer's defaults, ids past its 257 are free):
    ``mask_id`` replaces masked tokens (BERT; -1: ``vocab_size - 1``), ``sentinel_id`` is
    the first of the sentinels that stand for corrupted spans, counting down (T5; -1:
    ``vocab_size - 1``; T5's tokenizer has ``<extra_id_0>`` at 32099), ``decoder_start_id``
    opens the decoder's input (T5) and ``pad_id`` is RoBERTa's padding index. Import from
    Hugging Face reads ``pad_token_id`` and ``decoder_start_token_id`` from config.json;
    the mask and sentinel ids live in the tokenizer, so set them to its ids.
    """

    family: str = "llama"
    vocab_size: int = 512
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    mlp_dim: int = 704
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0
    remat: str = "none"
    remat_fraction: float = 1.0  # the share of the layers (the first ones) model.remat applies to
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention: str = "auto"
    context_parallel: str = "ring"  # attention over mesh.sequence > 1: ring | all_gather
    head_dim: int = 0  # 0: d_model // n_heads (filled in on load)
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int = 0  # 0: every earlier token is visible
    rope_scaling: RopeScalingConfig = RopeScalingConfig()
    moe: MoEConfig = MoEConfig()
    type_vocab_size: int = 2  # bert, roberta: rows of the token-type embedding
    relative_buckets: int = 32  # t5: relative position buckets
    relative_max_distance: int = 128  # t5: distances from here on share the last bucket
    pad_id: int = 0
    mask_id: int = -1  # -1: vocab_size - 1 (filled in on load)
    sentinel_id: int = -1  # -1: vocab_size - 1 (filled in on load)
    decoder_start_id: int = 0
    init_from: str = ""
    fp8: bool = False  # attention and MLP projections in float8 (models/fp8.py)
    fp8_history: int = 16  # steps of amax history a float8 scale is set from

    def fp8_steps(self) -> int:
        """The amax history length of float8 projections; 0 when ``fp8`` is off."""
        return self.fp8_history if self.fp8 else 0

    def remat_layers(self) -> int:
        """How many of the first layers ``remat`` applies to (``remat_fraction`` of them,
        rounded); the rest save every activation."""
        return round(self.remat_fraction * self.n_layers)

    def __post_init__(self) -> None:
        _check(
            self.family in FAMILY_OBJECTIVES,
            "model.family",
            f"unknown model {quote(self.family)} (known: {', '.join(FAMILY_OBJECTIVES)})",
        )
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim"):
            _check(getattr(self, name) > 0, f"model.{name}", "must be positive")
        _check(self.max_seq_len > 0, "model.max_seq_len", "must be positive")
        _check(self.head_dim >= 0, "model.head_dim", "must be positive (or 0: d_model / n_heads)")
        if self.head_dim == 0:
            _check(
                self.d_model % self.n_heads == 0,
                "model.n_heads",
                f"{self.n_heads} does not divide model.d_model={self.d_model}",
            )
            # A derived default, resolved once so the saved config spells it out.
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _check(
            self.n_heads % self.n_kv_heads == 0,
            "model.n_kv_heads",
            f"{self.n_kv_heads} does not divide model.n_heads={self.n_heads}",
        )
        _check(self.fp8_history > 0, "model.fp8_history", "must be positive")
        _check(
            not self.fp8 or self.family in FP8_FAMILIES,
            "model.fp8",
            f"is implemented for model.family {' and '.join(FP8_FAMILIES)}, not {self.family}",
        )
        _check(
            not (self.fp8 and self.moe.num_experts),
            "model.fp8",
            "is not implemented for model.moe's grouped expert matmuls",
        )
        _check(
            not (self.fp8 and self.compute_dtype == "float16"),
            "model.fp8",
            "with model.compute_dtype=float16 is not supported; compute in bfloat16",
        )
        if self.family == "llama":
            _check(self.head_dim % 2 == 0, "model.head_dim", "must be even for RoPE")
        else:
            for name in LLAMA_SWITCHES:
                _check(
                    not getattr(self, name),
                    f"model.{name}",
                    f"is a llama-family switch; model.family is {self.family}",
                )
            _check(
                self.rope_scaling.kind == "none",
                "model.rope_scaling.kind",
                f"is a llama-family switch; model.family is {self.family}",
            )
        _check(self.sliding_window >= 0, "model.sliding_window", "must be >= 0 (0: no window)")
        if self.moe.num_experts:
            _check(
                self.family == "llama",
                "model.moe.num_experts",
                f"mixture-of-experts layers are built for the llama family, not {self.family}",
            )
            if not self.moe.expert_mlp_dim:  # a derived default, spelled out when saved
                object.__setattr__(
                    self, "moe", dataclasses.replace(self.moe, expert_mlp_dim=self.mlp_dim)
                )
        for name in ("type_vocab_size", "relative_buckets", "relative_max_distance"):
            _check(getattr(self, name) > 0, f"model.{name}", "must be positive")
        for name in ("mask_id", "sentinel_id"):
            if getattr(self, name) == -1:  # derived defaults, spelled out in the saved config
                object.__setattr__(self, name, self.vocab_size - 1)
        for name in ("pad_id", "mask_id", "sentinel_id", "decoder_start_id"):
            _check(
                0 <= getattr(self, name) < self.vocab_size,
                f"model.{name}",
                f"must be a token id below model.vocab_size={self.vocab_size}",
            )
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(self.rope_theta > 0, "model.rope_theta", "must be positive")
        _check(self.norm_eps > 0, "model.norm_eps", "must be positive")
        _check(self.remat in REMAT_POLICIES, "model.remat", f"must be one of {REMAT_POLICIES}")
        _check(
            0.0 <= self.remat_fraction <= 1.0,
            "model.remat_fraction",
            f"must be in [0, 1], got {self.remat_fraction}",
        )
        _check(
            self.param_dtype != "float16",
            "model.param_dtype",
            "float16 master weights lose every update under 2**-11 of a weight; keep "
            "float32 (or bfloat16) and set model.compute_dtype=float16",
        )
        _check(
            self.param_dtype in PARAM_DTYPES,
            "model.param_dtype",
            f"must be one of {PARAM_DTYPES}, got {quote(self.param_dtype)}",
        )
        _check(
            self.compute_dtype in DTYPES,
            "model.compute_dtype",
            f"must be one of {DTYPES}, got {quote(self.compute_dtype)}",
        )
        _check(
            self.attention in ATTENTION_IMPLS,
            "model.attention",
            f"must be one of {ATTENTION_IMPLS}",
        )
        _check(
            self.context_parallel in CONTEXT_PARALLEL,
            "model.context_parallel",
            f"must be one of {CONTEXT_PARALLEL}",
        )
        _check(
            self.family != "t5" or self.attention in ("auto", "xla"),
            "model.attention",
            f"{self.attention!r} takes no additive score bias (t5's relative positions); "
            "use auto or xla",
        )
        _check(
            not self.init_from or self.init_from.startswith("hf:"),
            "model.init_from",
            f"expected hf:/path/to/hf_model_dir, got {quote(self.init_from)}",
        )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape and the sharding preset that maps logical axes onto it.

    ``data``, ``fsdp``, ``expert``, ``sequence`` and ``tensor`` are the whole axis sizes;
    one may be ``-1``: it takes all devices the others leave. ``sequence`` > 1 is context
    parallelism: every activation's length is split over it (parameters are not; they
    follow the preset), and attention runs as ``model.context_parallel`` says. ``expert``
    > 1 is expert parallelism (``model.moe``): each device holds that share of every
    layer's experts and tokens travel to their experts and back by all-to-all; outside
    the experts it splits the batch like ``data``. ``stage`` > 1 is pipeline parallelism:
    each stage holds a slice of the stacked layers, and the step's ``train.microbatches``
    flow through the stages (``jaxtrain.models.pipeline``); ``pipeline_repeats`` > 1 makes
    the schedule circular: each stage holds that many smaller slices, every microbatch
    passes through the stages that many times, and the bubble shrinks by that factor. In a
    multi-host run ``dcn_data``, ``dcn_stage``, ``dcn_fsdp`` and ``dcn_sequence`` say how
    many ways of the axis go across hosts (or TPU slices), over the slower data-center
    network; the rest of each axis, and all of ``tensor``, stays within a host. All 1 (the
    default) lets JAX lay the axes out over all devices.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    sequence: int = 1
    expert: int = 1
    stage: int = 1
    pipeline_repeats: int = 1
    preset: str = "fsdp"
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_sequence: int = 1
    dcn_stage: int = 1

    def __post_init__(self) -> None:
        sizes = self.axis_sizes()
        for name, size in sizes.items():
            _check(size == -1 or size >= 1, f"mesh.{name}", "must be >= 1 or -1 (fill)")
        _check(
            list(sizes.values()).count(-1) <= 1,
            "mesh",
            "at most one of mesh.data, mesh.stage, mesh.fsdp, mesh.expert, mesh.sequence, "
            "mesh.tensor may be -1",
        )
        _check(self.preset in PRESETS, "mesh.preset", f"must be one of {PRESETS}")
        _check(self.pipeline_repeats >= 1, "mesh.pipeline_repeats", "must be >= 1")
        for name in ("dcn_data", "dcn_fsdp", "dcn_sequence", "dcn_stage"):
            _check(getattr(self, name) >= 1, f"mesh.{name}", "must be >= 1")
        _check(
            self.tensor == 1 or self.preset == "fsdp_tp",
            "mesh.tensor",
            f"tensor={self.tensor} needs mesh.preset=fsdp_tp (preset is {self.preset})",
        )

    def resolve(self, n_devices: int, n_processes: int = 1) -> dict[str, int]:
        """The concrete axis sizes for ``n_devices`` devices (``-1`` filled in).

        Raises:
            UserError: if the sizes cannot multiply to ``n_devices``, or the across-host
                ways do not match ``n_processes`` processes.
        """
        have = f"{n_devices} devices"
        if n_processes > 1:
            have += f" ({n_processes} processes x {n_devices // n_processes} local devices)"
        sizes = self.axis_sizes()
        fixed = math.prod(s for s in sizes.values() if s != -1)
        for name, size in sizes.items():
            if size == -1:
                _check(
                    n_devices % fixed == 0,
                    f"mesh.{name}",
                    f"cannot fill: {have} are not divisible by the other axes' product {fixed}",
                )
                sizes[name] = n_devices // fixed
        _check(
            math.prod(sizes.values()) == n_devices,
            "mesh",
            f"{'*'.join(sizes)} = {'*'.join(str(v) for v in sizes.values())} = "
            f"{math.prod(sizes.values())}, but there are {have}",
        )
        for axis in ("data", "stage", "fsdp", "sequence"):
            ways = getattr(self, f"dcn_{axis}")
            _check(
                sizes[axis] % ways == 0,
                f"mesh.dcn_{axis}",
                f"{ways} does not divide mesh.{axis}={sizes[axis]}",
            )
        across = self.dcn_data * self.dcn_stage * self.dcn_fsdp * self.dcn_sequence
        _check(
            across == 1 or n_processes % across == 0,
            "mesh.dcn_data",
            f"dcn_data*dcn_stage*dcn_fsdp*dcn_sequence = {self.dcn_data}*{self.dcn_stage}*"
            f"{self.dcn_fsdp}*{self.dcn_sequence} = {across} host groups, but there are "
            f"{have}; it must divide the process count",
        )
        return sizes

    def axis_sizes(self) -> dict[str, int]:
        """The configured size of each mesh axis (-1: fills the remaining devices)."""
        names = ("data", "stage", "fsdp", "expert", "sequence", "tensor")
        return {name: getattr(self, name) for name in names}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay and global-norm clipping."""

    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be positive")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
        _check(0.0 <= self.b1 < 1.0, "optim.b1", "must be in [0, 1)")
        _check(0.0 <= self.b2 < 1.0, "optim.b2", "must be in [0, 1)")
        _check(self.eps > 0, "optim.eps", "must be positive")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. An empty ``path`` means the built-in stdlib corpus.

    With ``packing`` every row carries the documents' boundaries (split at EOS): per-token
    ``segment_ids`` keep attention within a document, ``positions`` restart at 0 at each
    document, and ``weights`` drop the targets that cross from one document to the next.

    ``eos_id`` is the document separator: -1 takes the tokenizer's own end-of-document
    token (a tokenizer.json without a known one is refused), another value that id.

    ``prefetch`` batches are built ahead, in a background thread, while the step runs
    (each held in device memory until its step); 0 builds each batch between steps.
    """

    path: str = ""
    tokenizer: str = "byte"
    seq_len: int = 256
    packing: bool = False
    eos_id: int = -1
    prefetch: int = 2

    def __post_init__(self) -> None:
        _check(self.seq_len > 0, "data.seq_len", "must be positive")
        _check(self.eos_id >= -1, "data.eos_id", "must be >= 0, or -1 for the tokenizer's own")
        _check(self.prefetch >= 0, "data.prefetch", "must be >= 0 (0 turns prefetching off)")


@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
    """Dynamic loss scaling (:mod:`jaxtrain.train.loss_scale`). ``kind: auto`` scales
    when ``model.compute_dtype`` is float16 and not otherwise; ``dynamic`` always; ``none``
    never (refused with float16). The loss is multiplied by the scale, starting at
    ``init``; a step with non-finite gradients is dropped and the scale divided by
    ``factor`` (not below ``min``); ``period`` finite steps in a row multiply it by
    ``factor``."""

    kind: str = "auto"
    init: float = 65536.0
    period: int = 2000
    factor: float = 2.0
    min: float = 1.0

    def __post_init__(self) -> None:
        key = "train.loss_scale"
        _check(self.kind in LOSS_SCALES, f"{key}.kind", f"must be one of {LOSS_SCALES}")
        _check(
            math.isfinite(self.init) and self.init > 0, f"{key}.init", "must be positive, finite"
        )
        _check(self.period > 0, f"{key}.period", "must be positive")
        _check(math.isfinite(self.factor) and self.factor > 1, f"{key}.factor", "must exceed 1")
        _check(
            math.isfinite(self.min) and 0 < self.min <= self.init,
            f"{key}.min",
            f"must be positive and at most {key}.init={self.init}",
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Length of the run, batch size, accumulation, how often to log and evaluate, and
    the objective: ``causal_lm`` (next token), ``mlm`` (masked tokens, BERT) or
    ``span_corruption`` (T5).

    ``loss_chunk_tokens``: the loss forms the float32 logits (and their gradient) of at
    most this many tokens per device at a time, in interleaved chunks of positions
    (:mod:`jaxtrain.train.loss`); a microbatch no larger is done whole, as is every
    microbatch with 0.

    ``grad_accumulation`` (with ``microbatches`` > 1): ``sharded`` keeps the gradient sum
    laid out like the parameters, so every microbatch's gradients are reduced across the
    batch shards (reduce-scattered under ZeRO-3, all-reduced when replicated); ``local``
    keeps each batch shard's own sum on its devices, unreduced, and reduces once per step.
    ``local`` costs full-size float32 gradients per device (less any tensor split) where
    the parameters are split over the batch axes (ZeRO-3) and nothing extra where they
    are replicated (``dp``, ``zero1``); each batch shard draws its own dropout masks.
    ``jaxtrain plan`` shows the memory and the collective bytes of either.

    ``grad_comm_dtype``: what gradients cross devices in; they are added in float32 on
    arrival either way. ``float32``: as computed. ``bfloat16``: half the bytes; under
    ``sharded`` each weight matmul forms its weight gradient in bfloat16, so the
    reduction XLA inserts after it adds in bfloat16 (as PyTorch FSDP's ``reduce_dtype``
    does), and only the microbatches' sum is float32; under ``local`` the step's one
    reduction sends bfloat16 and adds in float32 (:mod:`jaxtrain.sharding.grad_comm`).
    ``fp8``: a quarter of the bytes, float8 e5m2 with one scale per tensor; it needs
    ``local`` (a reduction that XLA inserts would add in float8).

    ``profile``: ``"A-B"`` writes a ``jax.profiler`` trace of steps A to B (counted from
    1, both included) into ``<run.dir>/profile`` (TensorBoard's profile tab, Perfetto);
    ``""``: none.

    ``loss_scale``: dynamic loss scaling (:class:`LossScaleConfig`), on by default for
    float16 compute.

    ``offload``: ``opt_state`` keeps the optimizer state in host memory, read onto the
    devices for each update (:mod:`jaxtrain.train.offload`); ``opt_state+params`` keeps
    the float32 master parameters there too, read onto the devices for each step;
    ``none`` keeps both on them.
    """

    steps: int = 100
    global_batch: int = 16
    microbatches: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 25
    eval_batches: int = 4
    on_nonfinite: str = "stop"
    objective: str = "causal_lm"
    loss_chunk_tokens: int = 4096
    grad_accumulation: str = "sharded"
    grad_comm_dtype: str = "float32"
    profile: str = ""
    loss_scale: LossScaleConfig = LossScaleConfig()
    offload: str = "none"

    @property
    def offloads_params(self) -> bool:
        """Whether the master weights live in host memory (``offload=opt_state+params``)."""
        return self.offload == "opt_state+params"

    def profile_steps(self) -> tuple[int, int] | None:
        """(first, last) step of ``profile``, or None."""
        if not self.profile:
            return None
        first, _, last = self.profile.partition("-")
        return int(first), int(last or first)

    def __post_init__(self) -> None:
        _check(
            not self.profile or re.fullmatch(r"\d+(-\d+)?", self.profile) is not None,
            "train.profile",
            f"must be a step range FIRST-LAST like 5-7 ('' for none), got {self.profile!r}",
        )
        if self.profile:
            first, last = self.profile_steps()
            _check(
                1 <= first <= last,
                "train.profile",
                f"{self.profile}: steps count from 1 and the range must not run backwards",
            )
        _check(self.steps > 0, "train.steps", "must be positive")
        _check(self.global_batch > 0, "train.global_batch", "must be positive")
        _check(self.microbatches > 0, "train.microbatches", "must be positive")
        # PRNGKey and numpy's seeding refuse negative seeds, and PRNGKey silently wraps
        # ones of 2**32 and more into the keys of small ones; like every integer setting,
        # a seed also fits in 32 bits (INT_MAX).
        _check(0 <= self.seed <= INT_MAX, "train.seed", f"must be in [0, {INT_MAX}]")
        _check(
            self.global_batch % self.microbatches == 0,
            "train.microbatches",
            f"{self.microbatches} does not divide train.global_batch={self.global_batch}",
        )
        _check(
            self.grad_accumulation in GRAD_ACCUMULATIONS,
            "train.grad_accumulation",
            f"must be one of {GRAD_ACCUMULATIONS}",
        )
        _check(
            self.grad_comm_dtype in GRAD_COMM_DTYPES,
            "train.grad_comm_dtype",
            f"must be one of {GRAD_COMM_DTYPES}",
        )
        _check(
            self.grad_comm_dtype != "fp8" or self.grad_accumulation == "local",
            "train.grad_comm_dtype",
            "fp8 needs train.grad_accumulation=local: the sharded accumulation's reductions "
            "run inside collectives XLA inserts, which would add in float8",
        )
        _check(self.log_every > 0, "train.log_every", "must be positive")
        _check(self.eval_every >= 0, "train.eval_every", "must be >= 0 (0 disables)")
        _check(self.eval_batches > 0, "train.eval_batches", "must be positive")
        _check(
            self.on_nonfinite in NONFINITE_ACTIONS,
            "train.on_nonfinite",
            f"must be one of {NONFINITE_ACTIONS}",
        )
        _check(self.objective in OBJECTIVES, "train.objective", f"must be one of {OBJECTIVES}")
        _check(self.offload in OFFLOADS, "train.offload", f"must be one of {OFFLOADS}")
        _check(
            self.loss_chunk_tokens >= 0,
            "train.loss_chunk_tokens",
            "must be >= 0 (0: the logits of a whole microbatch at once)",
        )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints of the whole train state under ``<run.dir>/checkpoints``."""

    every: int = 100
    keep: int = 3
    keep_every: int = 0
    resume: bool = True
    async_save: bool = True

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", "must be >= 0 (0: only at the end)")
        _check(self.keep >= 1, "checkpoint.keep", "must be >= 1")
        _check(self.keep_every >= 0, "checkpoint.keep_every", "must be >= 0 (0: none kept)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where the run writes its config, metrics, TensorBoard logs and parameters."""

    dir: str = "runs/tiny"

    def __post_init__(self) -> None:
        _check(bool(self.dir), "run.dir", "must not be empty")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The short sample ``jaxtrain train`` prints from the model it trained (decoder
    families trained with ``causal_lm``): ``prompt`` continued for ``max_new_tokens``
    tokens (0: no sample; ``--no-sample`` too), greedily at ``temperature`` 0, else
    sampled with the run's seed. An empty prompt starts a new document (the tokenizer's
    end-of-document token)."""

    prompt: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.0

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 0, "sample.max_new_tokens", "must be >= 0 (0: no sample)")
        _check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "sample.temperature",
            "must be >= 0 (0: greedy)",
        )


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """The hardware a config is written for, read by ``jaxtrain plan``: the device kind
    (free text, e.g. "H100 80GB" or "TPU v5e"), how many, and the memory of each in GiB.
    The defaults mean the machine it runs on: the devices present and their memory."""

    device: str = ""
    devices: int = 0
    hbm_gib: float = 0.0

    def __post_init__(self) -> None:
        _check(self.devices >= 0, "target.devices", "must be >= 0 (0: the devices present)")
        _check(self.hbm_gib >= 0, "target.hbm_gib", "must be >= 0 (0: not stated)")


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run. Cross-section checks that need no devices live here."""

    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run: RunConfig = RunConfig()
    sample: SampleConfig = SampleConfig()
    target: TargetConfig = TargetConfig()

    def __post_init__(self) -> None:
        _check(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        objective, family = self.train.objective, self.model.family
        want = FAMILY_OBJECTIVES.get(family, objective)
        _check(
            objective == want,
            "train.objective",
            f"{objective} does not train a {family} model; use train.objective={want}",
        )
        _check(
            not (self.model.compute_dtype == "float16" and self.train.loss_scale.kind == "none"),
            "train.loss_scale.kind",
            "none with model.compute_dtype=float16 lets small gradients underflow to zero; "
            "use auto or dynamic (or compute in bfloat16)",
        )
        profiled = self.train.profile_steps()
        _check(
            profiled is None or profiled[1] <= self.train.steps,
            "train.profile",
            f"{self.train.profile} runs past train.steps={self.train.steps}",
        )
        local = self.train.grad_accumulation == "local" and (
            self.train.microbatches > 1 or self.train.grad_comm_dtype != "float32"
        )
        _check(
            not (self.model.moe.num_experts and local),
            "train.grad_accumulation",
            "local is not supported with model.moe (its grouped matmuls do not batch over "
            "shards); use sharded",
        )
        _check(
            not (self.model.fp8 and local),
            "train.grad_accumulation",
            "local is not supported with model.fp8 (its amax histories are not kept per "
            "shard); use sharded",
        )
        _check(
            not (self.train.offloads_params and self.model.remat_fraction < 1),
            "model.remat_fraction",
            f"{self.model.remat_fraction} splits the layer scan by slicing the stacked "
            "parameters, which train.offload=opt_state+params keeps in host memory; use 1",
        )
        _check(
            not (self.data.packing and objective == "span_corruption"),
            "data.packing",
            "is not supported with train.objective=span_corruption (T5 rows are not packed)",
        )

    def loss_scaling(self) -> bool:
        """Whether the step scales its loss (``train.loss_scale``)."""
        kind = self.train.loss_scale.kind
        return kind == "dynamic" or (kind == "auto" and self.model.compute_dtype == "float16")

    def check_devices(self, n_devices: int, n_processes: int = 1) -> dict[str, int]:
        """Validate the parts that depend on the device count; return the mesh sizes."""
        sizes = self.mesh.resolve(n_devices, n_processes)
        tensor = sizes["tensor"]
        for key in ("n_heads", "n_kv_heads"):
            value = getattr(self.model, key)
            _check(
                value % tensor == 0,
                f"model.{key}",
                f"{value} is not divisible by mesh.tensor={tensor}",
            )
        ways = sizes["sequence"]
        if ways > 1:
            _check(
                self.model.family in CONTEXT_FAMILIES,
                "mesh.sequence",
                f"{ways}: context parallelism is implemented for model.family "
                f"{' and '.join(CONTEXT_FAMILIES)}, not {self.model.family}",
            )
            _check(
                self.data.seq_len % (2 * ways) == 0,
                "data.seq_len",
                f"{self.data.seq_len} is not divisible by 2 x mesh.sequence={ways} (each "
                "device holds two chunks of every sequence)",
            )
        experts = sizes["expert"]
        if experts > 1:
            _check(
                self.model.moe.num_experts > 0,
                "mesh.expert",
                f"{experts} splits experts, but the model has none (model.moe.num_experts=0)",
            )
            _check(
                self.model.moe.num_experts % experts == 0,
                "model.moe.num_experts",
                f"{self.model.moe.num_experts} is not divisible by mesh.expert={experts}",
            )
        self._check_stages(sizes)
        batch_shards = sizes["data"] * sizes["fsdp"] * experts
        micro = self.train.global_batch // self.train.microbatches
        _check(
            micro % batch_shards == 0,
            "train.global_batch",
            f"{self.train.global_batch} / train.microbatches={self.train.microbatches} = {micro} "
            f"rows per microbatch is not divisible by mesh data*fsdp*expert={batch_shards}",
        )
        return sizes

    def _check_stages(self, sizes: dict[str, int]) -> None:
        """Pipeline parallelism (``mesh.stage`` > 1): what it needs and what it does not
        combine with yet, each a one-line error naming its key."""
        stages, repeats = sizes["stage"], self.mesh.pipeline_repeats
        _check(
            stages > 1 or repeats == 1,
            "mesh.pipeline_repeats",
            f"{repeats} needs pipeline stages (mesh.stage > 1)",
        )
        if stages == 1:
            return
        model, train = self.model, self.train
        _check(
            model.family in PIPELINE_FAMILIES,
            "mesh.stage",
            f"{stages}: pipeline parallelism is implemented for model.family "
            f"{' and '.join(PIPELINE_FAMILIES)}, not {model.family}",
        )
        _check(
            model.n_layers % (stages * repeats) == 0,
            "model.n_layers",
            f"{model.n_layers} is not divisible by mesh.stage={stages} x "
            f"mesh.pipeline_repeats={repeats} (each stage holds equal slices of the layers)",
        )
        _check(
            train.microbatches >= stages,
            "train.microbatches",
            f"{train.microbatches} is fewer than mesh.stage={stages}: every stage needs a "
            "microbatch in flight",
        )
        refused = {
            "mesh.sequence": (sizes["sequence"] > 1, "context parallelism"),
            "model.moe.num_experts": (model.moe.num_experts > 0, "mixture-of-experts layers"),
            "model.fp8": (model.fp8, "FP8 matmuls"),
            "model.remat_fraction": (model.remat_fraction < 1, "partial remat"),
            "train.offload": (train.offloads_params, "master weights in host memory"),
            "train.grad_accumulation": (
                train.grad_accumulation == "local",
                "local gradient accumulation",
            ),
        }
        for key, (bad, what) in refused.items():
            _check(not bad, key, f"mesh.stage={stages} does not combine with {what} yet")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _as_float(value: Any, key: str) -> float | None:
    """``value`` as a finite float, or None when it is not a number at all."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the float it spells.
        number = float(value)
    except OverflowError:  # an int beyond float's range
        number = math.inf
    except ValueError:
        return None
    _check(math.isfinite(number), key, f"must be a finite number, got {quote(value)}")
    return number


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type; ints and numeric strings pass as floats.

    The bounds every field of a type shares are checked here, once: integers fit in 32
    bits (``INT_MIN``..``INT_MAX``), floats are finite (an infinite rate would train and
    diverge later), strings hold text a file name can (no NUL, no undecodable bytes).
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise UserError(f"{key}: expected {hint}, got {quote(value)}")
    if hint is float:
        number = _as_float(value, key)
        _check(number is not None, key, f"expected float, got {_kind(value)} {quote(value)}")
        return number
    if hint is type(None):
        _check(value is None, key, f"expected null, got {quote(value)}")
        return value
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    _check(ok, key, f"expected {hint.__name__}, got {_kind(value)} {quote(value)}")
    if hint is int:
        _check(
            INT_MIN <= value <= INT_MAX,
            key,
            f"{quote(value)} is out of range: integers must fit in 32 bits (below 2**31)",
        )
    if hint is str:
        _check("\0" not in value, key, f"{quote(value)} contains a NUL character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes from the command line
            raise UserError(f"{key}: {quote(value)} is not valid UTF-8 text") from None
    return value


def _known(name: str, prefix: str, fields: Sequence[str]) -> str:
    """A hint for an unknown key: the close one, else the known ones (a few, when the
    section has many: the shipped tiny.yaml lists every key with its default)."""
    close = difflib.get_close_matches(name, fields, n=1)
    if close:
        return f"did you mean {prefix}{close[0]}?"
    names = list(fields)
    if len(names) > 8:
        return f"known: {', '.join(names[:6])} and {len(names) - 6} more, as in tiny.yaml"
    return f"known: {', '.join(names)}"


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "config"
        raise UserError(f"{where}: expected a mapping, got {_kind(data)} {quote(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise UserError(f"{quote(key)}: unknown key ({_known(str(name), prefix, fields)})")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{key}.")
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain data."""
    return _build(Config, data or {}, "")


def model_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """Build and validate a :class:`ModelConfig` alone, from plain data (a saved model's
    section, with no run around it), checked key by key as a config file's is."""
    return _build(ModelConfig, data, "model.")


def _parse_override(item: str) -> tuple[list[str], Any]:
    shown = quote(item)
    if "=" not in item:
        raise UserError(f"--set {shown}: expected key=value, e.g. train.steps=20")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise UserError(f"--set {shown}: bad key {quote(key)}")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except DuplicateKey as err:
        raise UserError(f"--set {shown}: {err.problem}") from None
    except (yaml.YAMLError, ValueError, RecursionError):
        value = raw  # not YAML: the plain string, which the field's type check judges
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` overrides (values parsed as YAML scalars) into ``data``."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {quote(item)}: {quote(part)} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    ``path`` is a YAML file, or the bare name of a shipped config (``llama3-8b`` or
    ``llama3-8b.yaml``, see :func:`~jaxtrain.config_file.shipped_configs`) when no such
    file exists.

    Raises:
        UserError: for a missing or malformed file, unknown keys or invalid values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_config(path)
    return from_dict(apply_overrides(data, overrides))

"""THE logical-axis -> mesh-axis table, and its presets.

Models name their dimensions logically (``("embed", "mlp")``); only this file knows the
mesh. A preset is a named pair of rule sets: one for parameters (and activations), one
for optimizer state. In ZeRO terms (Rajbhandari et al., 2020):

- ``dp``: plain data parallelism; everything replicated, the batch split.
- ``fsdp``: ZeRO-3; parameters and optimizer state split over ``fsdp`` on ``embed``.
- ``fsdp_tp``: ``fsdp`` plus Megatron tensor parallelism (Shoeybi et al., 2019) on
  heads, MLP and vocabulary.
- ``zero1``: parameters replicated, optimizer state split over ``data`` and ``fsdp``.

Context parallelism (``sequence``) splits every activation's length, so its devices
would otherwise each hold the same state, as data-parallel ways do. Wherever a preset
splits state over ``fsdp`` it splits it over ``sequence`` too (ZeRO over the context-
parallel ways, as MaxText shards weights over its context axis): ``sequence`` x N then
divides the state N ways, instead of multiplying it N times per device. A size-1
``sequence`` leaves every layout as it was.

Pipeline parallelism (``stage``) splits the stacked layers' ``layers`` axis: each stage
holds a contiguous slice of every stacked parameter and its optimizer state, whatever the
preset does with the other axes.
"""

from __future__ import annotations

import dataclasses

MeshAxes = str | tuple[str, ...] | None

# Logical names that may appear on activations; the same in every preset.
_ACTIVATIONS: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp", "expert"),
    # The rows out of a pipeline (the LM head's and loss's input): each batch shard's
    # rows split over the stages too, so no stage repeats another's head and loss.
    "head_batch": ("data", "fsdp", "expert", "stage"),
    "length": "sequence",  # context parallelism; size 1 unless mesh.sequence > 1
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

_REPLICATED: dict[str, MeshAxes] = {
    "layers": "stage",  # pipeline parallelism: a stage's contiguous slice of the stack
    "vocab": None,
    "embed": None,
    "mlp": None,
    "heads": None,
    "kv_heads": None,
    "head_dim": None,
    "norm": None,
    "bias": None,  # the last axis of a bias: small, kept whole (and not weight-decayed)
    "positions": None,  # rows of a learned position table (GPT-2, BERT)
    "token_types": None,  # rows of BERT's token-type (segment A/B) table
    "rel_buckets": None,  # rows of T5's relative position bias table
    "exp": "expert",  # the experts of a mixture-of-experts layer's stacked weights
    "router": None,  # a router's output: one score per expert
    "fp8_tensor": None,  # a float8 projection's amax history: rows x, w, g ...
    "fp8_history": None,  # ... by the steps it remembers
}

_ZERO3 = _REPLICATED | {"embed": ("fsdp", "sequence")}
_ZERO3_TP = _ZERO3 | {"vocab": "tensor", "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor"}
_ZERO1_OPT = _REPLICATED | {"embed": ("data", "fsdp", "sequence")}


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis -> mesh axes, for parameters and activations and for optimizer state."""

    params: tuple[tuple[str, MeshAxes], ...]
    opt_state: tuple[tuple[str, MeshAxes], ...]

    def lookup(self, name: str | None, *, for_opt_state: bool = False) -> MeshAxes:
        """The mesh axes for logical ``name``; ``None`` means not sharded.

        Raises:
            KeyError: if ``name`` is not in the table.
        """
        if name is None:
            return None
        table = dict(self.opt_state if for_opt_state else self.params)
        if name not in table:
            raise KeyError(name)
        return table[name]

    def within_batch_shard(self) -> Rules:
        """These rules for code that runs on one batch shard's rows (vmapped over the
        batch axes, as local gradient accumulation does): ``batch`` maps to no mesh
        axis, everything else as here."""
        return self.unsplit("batch")

    def for_generation(self) -> Rules:
        """These rules for generation: a batch of prompts too small to split, and one
        token per step, so neither ``batch`` nor ``length`` is split; and every device
        runs every layer, so ``layers`` is not split over pipeline stages."""
        return self.unsplit("batch", "length", "layers")

    def unsplit(self, *names: str) -> Rules:
        """These rules with the logical axes ``names`` mapped to no mesh axis."""
        return Rules(
            params=tuple((k, None if k in names else v) for k, v in self.params),
            opt_state=tuple((k, None if k in names else v) for k, v in self.opt_state),
        )


def _rules(params: dict[str, MeshAxes], opt_state: dict[str, MeshAxes] | None = None) -> Rules:
    opt_state = params if opt_state is None else opt_state
    return Rules(
        params=tuple((params | _ACTIVATIONS).items()),
        opt_state=tuple((opt_state | _ACTIVATIONS).items()),
    )


PRESETS: dict[str, Rules] = {
    "dp": _rules(_REPLICATED),
    "fsdp": _rules(_ZERO3),
    "fsdp_tp": _rules(_ZERO3_TP),
    "zero1": _rules(_REPLICATED, _ZERO1_OPT),
}


def preset(name: str) -> Rules:
    """The rules of a named preset (``dp``, ``fsdp``, ``fsdp_tp``, ``zero1``)."""
    return PRESETS[name]

"""Model families, looked up by ``model.family``, and Hugging Face import/export."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from jaxtrain.config import ModelConfig
from jaxtrain.errors import UserError
from jaxtrain.models.bert import Bert
from jaxtrain.models.gpt2 import GPT2
from jaxtrain.models.layers import Shard, no_shard
from jaxtrain.models.llama import Llama
from jaxtrain.models.t5 import T5

# BERT and RoBERTa are one network; the family names its position scheme and HF layout.
FAMILIES: dict[str, Callable[..., nnx.Module]] = {
    "llama": Llama,
    "gpt2": GPT2,
    "bert": Bert,
    "roberta": Bert,
    "t5": T5,
}


def build(cfg: ModelConfig, *, rngs: nnx.Rngs, shard: Shard = no_shard) -> nnx.Module:
    """Construct the model named by ``cfg.family``.

    Raises:
        UserError: for an unknown family.
    """
    if cfg.family not in FAMILIES:
        raise UserError(
            f"model.family: unknown model {cfg.family!r} (known: {', '.join(FAMILIES)})"
        )
    return FAMILIES[cfg.family](cfg, rngs=rngs, shard=shard)


from jaxtrain.models.hf import config_from_hf, from_pretrained, save_pretrained  # noqa: E402

__all__ = [
    "FAMILIES",
    "GPT2",
    "T5",
    "Bert",
    "Llama",
    "build",
    "config_from_hf",
    "from_pretrained",
    "save_pretrained",
]

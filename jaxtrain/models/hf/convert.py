"""Import and export Hugging Face model directories.

Import: ``config.json`` gives the :class:`~jaxtrain.config.ModelConfig`; each parameter
is then built straight into its target ``NamedSharding`` from the safetensors files
(:func:`~jaxtrain.models.hf.files.place`): every device's block is read from disk on its
own, so no step holds the whole model on one device or in host memory.

Export: each HF tensor is gathered from the devices (one at a time), laid out as HF
stores it, and written to size-capped safetensors shards with an index, next to a
``config.json`` that transformers' ``from_pretrained`` loads (``AutoModelForCausalLM``,
``AutoModelForMaskedLM`` for BERT and RoBERTa, ``AutoModelForSeq2SeqLM`` for T5).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, SingleDeviceSharding

from jaxtrain.config import ModelConfig
from jaxtrain.errors import UserError
from jaxtrain.models.fp8 import is_history_path
from jaxtrain.models.hf.config import (
    ARCHITECTURE_FIELDS,
    MOE_ARCHITECTURE_FIELDS,
    config_from_hf,
    config_to_hf,
    read_config,
)
from jaxtrain.models.hf.files import (
    Checkpoint,
    iter_layers,
    place,
    read_block,
    write_shards,
)
from jaxtrain.models.hf.mapping import IGNORED_SUFFIXES, Source, sources, tied_copies
from jaxtrain.sharding import Rules, param_logical_axes, path_str, preset, tree_shardings

MAX_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    return {
        tuple(path_str([k]) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _unflat(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def check_architecture(cfg: ModelConfig, directory: str | Path) -> None:
    """Raise unless ``cfg`` describes the same architecture as ``directory``'s config.json.

    Of ``model.moe`` only the experts' shape and routing are compared: capacity and the
    loss weights are the run's to choose.

    Raises:
        UserError: naming every differing ``model.*`` key and the value to set.
    """
    theirs = config_from_hf(read_config(directory))
    fields = ARCHITECTURE_FIELDS
    if {cfg.family, theirs.family} & {"gpt2", "bert", "roberta"}:
        fields = (*fields, "max_seq_len")  # the position table's rows
    if "roberta" in (cfg.family, theirs.family):
        fields = (*fields, "pad_id")  # RoBERTa's positions start after it
    if cfg.moe.num_experts and theirs.moe.num_experts:
        fields = tuple(f for f in fields if f != "mlp_dim")  # only the experts' width is used
    diffs = []
    for name in fields:
        want = getattr(theirs, name)
        if getattr(cfg, name) == want:
            continue
        if dataclasses.is_dataclass(want):
            keys = MOE_ARCHITECTURE_FIELDS if name == "moe" else dataclasses.asdict(want)
            diffs += [
                f"model.{name}.{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k in keys
                if getattr(getattr(cfg, name), k) != (v := getattr(want, k))
            ]
        else:
            diffs.append(f"model.{name}={str(want).lower() if isinstance(want, bool) else want}")
    if diffs:
        raise UserError(
            f"model.init_from: {directory} holds a different architecture; set " + " ".join(diffs)
        )


def load_params(
    directory: str | Path, cfg: ModelConfig, abstract_params: Any, shardings: Any | None = None
) -> Any:
    """The parameters of an HF checkpoint, each placed straight into its sharding.

    Args:
        directory: an HF model directory (config.json + safetensors).
        cfg: the model config; must describe the checkpoint's architecture.
        abstract_params: the model's pure-dict parameter tree (shapes and dtypes).
        shardings: a same-shaped tree of shardings; default: the first device.

    Returns:
        The parameter tree, as ``jax.Array`` in ``shardings`` and the params' dtypes.

    Raises:
        UserError: for a missing, pickled, mismatched or incomplete checkpoint.
    """
    check_architecture(cfg, directory)
    wanted = sources(cfg)
    shapes = _flat(abstract_params)
    if shardings is None:
        one = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract_params)
    placements = _flat(shardings)
    # Float8 amax histories (model.fp8) are not in HF checkpoints: they start empty.
    empty = {path for path in shapes if is_history_path(path)}
    assert set(wanted) == set(shapes) - empty, set(wanted) ^ (set(shapes) - empty)
    with Checkpoint(directory) as ckpt:
        resolved = {}
        for path, src in wanted.items():
            names = tuple(ckpt.resolve(n) for n in src.names)
            if None in names and src.fallback is not None:
                other = tuple(ckpt.resolve(n) for n in src.fallback.names)
                if None not in other:
                    src, names = src.fallback, other
            missing = [n for n, r in zip(src.names, names, strict=True) if r is None]
            if missing:
                raise UserError(f"{directory}: the checkpoint has no tensor {missing[0]}")
            resolved[path] = dataclasses.replace(src, names=names)
        used = {name for src in resolved.values() for name in src.names}
        copies = tied_copies(cfg)  # tied copies, if saved
        extra = sorted(
            name
            for name in set(ckpt.files) - used
            if not name.endswith(IGNORED_SUFFIXES) and name not in copies
        )
        if extra:
            raise UserError(
                f"{directory}: tensor {extra[0]} (and {len(extra) - 1} more) has no place in a "
                f"{cfg.family} model with this config"
            )
        out = {
            path: place(
                leaf.shape,
                leaf.dtype,
                placements[path],
                lambda index, src=resolved[path], leaf=leaf: read_block(
                    ckpt, src, index, leaf.shape, leaf.dtype
                ),
            )
            for path, leaf in shapes.items()
            if path not in empty
        }
        for path in empty:
            leaf = shapes[path]
            zeros = np.zeros(leaf.shape, leaf.dtype)
            out[path] = place(leaf.shape, leaf.dtype, placements[path], lambda i, z=zeros: z[i])
    return _unflat(out)


def _abstract(cfg: ModelConfig, mesh: Mesh | None, rules: Rules | None) -> tuple[Any, Any, Any]:
    """(graphdef, abstract Param state, logical axes) of a ``cfg`` model, allocating nothing."""
    from jaxtrain import models  # the registry imports this package
    from jaxtrain.sharding import ActivationSharding

    shard = ActivationSharding(mesh, rules) if mesh is not None else models.no_shard
    abstract = nnx.eval_shape(lambda: models.build(cfg, rngs=nnx.Rngs(0), shard=shard))
    graphdef, state = nnx.split(abstract, nnx.Param)
    return graphdef, state, param_logical_axes(state)


def from_pretrained(
    path: str | Path, mesh: Mesh | None = None, *, rules: Rules | str = "fsdp"
) -> tuple[ModelConfig, nnx.Module]:
    """Load an HF model directory as a jaxtrain model.

    Args:
        path: the directory (config.json + model.safetensors, or shards and their index).
        mesh: place every parameter in its sharding on this mesh (activations are
            constrained too); default: the first device.
        rules: the sharding rules or a preset name (``dp``, ``fsdp``, ``fsdp_tp``, ...).

    Returns:
        (the model config, the model with the checkpoint's parameters).

    Raises:
        UserError: for an unsupported architecture or an unreadable checkpoint.
    """
    cfg = config_from_hf(read_config(path))
    rules = preset(rules) if isinstance(rules, str) else rules
    graphdef, state, logical = _abstract(cfg, mesh, rules if mesh is not None else None)
    abstract_params = nnx.to_pure_dict(state)
    shardings = None
    if mesh is not None:
        shardings = tree_shardings(abstract_params, logical, mesh, rules)
    params = load_params(path, cfg, abstract_params, shardings)
    nnx.replace_by_pure_dict(state, params)
    return cfg, nnx.merge(graphdef, state)


def _gather(x: jax.Array) -> np.ndarray:
    """The whole of ``x`` on the host, from every process's devices."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_pretrained(
    cfg: ModelConfig,
    params: Any,
    out: str | Path,
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write ``params`` of a ``cfg`` model as an HF model directory.

    Args:
        cfg: the model config.
        params: the pure-dict parameter tree (as in a train state), or the nnx model.
        out: the directory to write (created; files in it are replaced).
        max_shard_bytes: above this the weights are split into several safetensors
            files with a ``model.safetensors.index.json``.

    Returns:
        The directory. Only process 0 writes; every process must call this.

    Raises:
        UserError: if no HF architecture expresses ``cfg``.
    """
    hf_config = config_to_hf(cfg)
    if isinstance(params, nnx.Module):
        params = nnx.to_pure_dict(nnx.state(params, nnx.Param))
    flat = _flat(params)
    contributions: dict[str, list[tuple[tuple[str, ...], Any, Source]]] = {}
    for path, src in sources(cfg).items():
        for layer, name in iter_layers(src):
            contributions.setdefault(name, []).append((path, layer, src))

    def fetch(name: str) -> np.ndarray:
        first_path, _, first_src = contributions[name][0]
        out_arr = np.empty(first_src.hf, flat[first_path].dtype)
        for path, layer, src in contributions[name]:
            block = _gather(flat[path] if layer is None else flat[path][layer])
            block = block.transpose(np.argsort(src.axes)).reshape(src.part_shape)
            where = [slice(None)] * out_arr.ndim
            if src.part is not None:
                where[src.part[0]] = slice(src.part[1], src.part[2])
            out_arr[tuple(where)] = block
        return out_arr

    tensors = [(name, c[0][2].hf, flat[c[0][0]].dtype) for name, c in contributions.items()]
    out = Path(out)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        for old in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
            old.unlink()
        write_shards(out, tensors, fetch, max_shard_bytes)
        (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    else:  # the gathers are collective: take part in them, write nothing
        for name, _, _ in tensors:
            fetch(name)
    return out

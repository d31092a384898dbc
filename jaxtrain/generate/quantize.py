"""``jaxtrain quantize``: int8 weight-only post-training quantization of a run's newest
checkpoint or of a Hugging Face model, written as a directory that ``jaxtrain generate
--quantized`` (:meth:`jaxtrain.generate.api.Generator.from_quantized`) reads.

Every matmul weight (attention q, k, v and output, the MLP, an untied LM head) becomes
int8 with float32 scales, symmetric, one per output channel or one per group of inputs
(:mod:`jaxtrain.models.quantized`). Embedding tables (read by a lookup, so a tied LM
head too), norms and biases keep their float dtype. The directory holds

- ``quantization.json``: format, bits, group size, the model config, the tokenizer and
  the list of int8 weights;
- ``model.safetensors``: every parameter under its path (``blocks/attn/wq``), an int8
  weight W as ``W/values`` (int8, W's shape) and ``W/scale`` (float32 ``[layers, G,
  C_out]``);
- ``tokenizer.json``: the source's, when it has one (a run may use bytes), with its
  ``tokenizer_config.json`` and ``chat_template.jinja`` when they are there.

Nothing is pickled. Generation puts the int8 arrays in device memory as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxtrain.config import ModelConfig, model_from_dict
from jaxtrain.data import Tokenizer, load_tokenizer
from jaxtrain.errors import UserError, quote
from jaxtrain.models.quantized import (
    BITS,
    QuantizedWeight,
    contracted_axes,
    input_size,
    quantize,
)
from jaxtrain.sharding import param_logical_axes, path_str

FORMAT = "jaxtrain-int8"
META = "quantization.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja")  # copied with the tokenizer


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A model whose matmul weights are int8.

    Attributes:
        model: its config.
        params: the pure-dict parameter tree, :class:`QuantizedWeight` where int8.
        group_size: inputs per scale; 0: one scale per output channel.
        tokenizer: the tokenizer prompts are encoded with, or None.
    """

    model: ModelConfig
    params: Any
    group_size: int
    tokenizer: Tokenizer | None


def is_quantized(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``jaxtrain quantize``."""
    return (Path(path) / META).is_file()


def param_bytes(params: Any) -> int:
    """Bytes of the arrays in ``params`` (int8 values and their scales included)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def int8_paths(params: Any) -> list[str]:
    """The paths of the int8 weights in ``params``."""
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, QuantizedWeight)
    )[0]
    return [path_str(p) for p, leaf in flat if isinstance(leaf, QuantizedWeight)]


def quantize_params(params: Any, logical: Any, group_size: int = 0) -> Any:
    """``params`` with every matmul weight as a :class:`QuantizedWeight`.

    Args:
        params: a pure-dict parameter tree.
        logical: the same tree's logical axes (a tuple per parameter).
        group_size: inputs per scale; 0: one scale per output channel.

    Raises:
        UserError: if ``group_size`` is negative or does not divide a weight's inputs.
    """
    _check_group_size(group_size)

    def check(path, w, axes):
        n = contracted_axes(axes)
        c_in = input_size(w.shape, n, lead=int(axes[0] == "layers"))
        if n and group_size and c_in % group_size:
            raise UserError(
                f"--group-size: {group_size} does not divide the {c_in} inputs of "
                f"{path_str(path)}; use a divisor of every weight's input size"
            )

    def one(path, w, axes):
        n = contracted_axes(axes)
        if not n:
            return w
        return quantize(w, n, lead=int(axes[0] == "layers"), group=group_size)

    jax.tree_util.tree_map_with_path(check, params, logical)  # refuse before any work
    return jax.tree_util.tree_map_with_path(one, params, logical)


def _check_group_size(group_size: int) -> None:
    if group_size < 0:
        raise UserError(
            f"--group-size: must be positive (or 0: a scale per output channel), got {group_size}"
        )


def _from_run(run: str, overrides: Sequence[str], console: Console) -> tuple:
    """(model config, parameters, logical axes, tokenizer, description) of a run."""
    from jaxtrain.train.runs import load_run

    cfg, program, state, step = load_run(run, overrides, console)
    tokenizer = load_tokenizer(cfg.data.tokenizer, eos_id=cfg.data.eos_id)
    params = program.model_params(state.params)
    return cfg.model, params, program.spec.logical, tokenizer, f"step {step} of {run}"


def _from_hf(path: str) -> tuple:
    """(model config, parameters, logical axes, tokenizer or None, description) of an HF
    model directory."""
    from jaxtrain.models import from_pretrained

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"--hf: {path} is not a Hugging Face model directory (no config.json)")
    cfg, model = from_pretrained(path)
    state = nnx.state(model, nnx.Param)
    has_tokenizer = (Path(path) / TOKENIZER).is_file()
    tokenizer = load_tokenizer(str(path)) if has_tokenizer else None
    return cfg, nnx.to_pure_dict(state), param_logical_axes(state), tokenizer, str(path)


def quantize_command(
    out: str,
    *,
    run: str | None = None,
    hf: str | None = None,
    group_size: int = 0,
    overrides: Sequence[str] = (),
    console: Console | None = None,
) -> str:
    """Quantize a run (``run``) or an HF model directory (``hf``) into ``out``.

    Returns:
        One line saying what was written.

    Raises:
        UserError: if ``out`` exists and is not empty, the source is unreadable, its
            family cannot generate, or ``group_size`` does not fit its weights.
    """
    from jaxtrain.generate.api import DECODERS
    from jaxtrain.train.rundir import check_dir_path

    target = Path(out).absolute()
    check_dir_path(target, "--out")
    if target.exists() and any(target.iterdir()):
        raise UserError(f"--out: {out} exists and is not empty")
    _check_group_size(group_size)
    flag = "--run" if run else "--hf"
    if run:
        cfg, params, logical, tokenizer, source = _from_run(
            run, overrides, console or Console(stderr=True)
        )
    else:
        cfg, params, logical, tokenizer, source = _from_hf(str(hf))
    if cfg.family not in DECODERS:
        raise UserError(
            f"{flag}: model.family={cfg.family} cannot generate yet, so there is nothing to "
            f"quantize it for (jaxtrain generate runs {', '.join(DECODERS)})"
        )
    quantized = Quantized(cfg, quantize_params(params, logical, group_size), group_size, tokenizer)
    save(quantized, target)
    before, after = param_bytes(params), param_bytes(quantized.params)
    scales = f"group of {group_size} inputs" if group_size else "output channel"
    return (
        f"wrote {out}: {len(int8_paths(quantized.params))} weights of {source} as int8 with a "
        f"float32 scale per {scales}; parameters {before / 2**20:.2f} MiB -> "
        f"{after / 2**20:.2f} MiB"
    )


def save(quantized: Quantized, out: str | Path) -> None:
    """Write ``quantized`` as a new directory ``out`` (absent or empty): written aside,
    then moved into place, so a failure leaves no half-written model behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        flat = jax.tree_util.tree_flatten_with_path(quantized.params)[0]
        tensors = {path_str(p): np.asarray(jax.device_get(x)) for p, x in flat}
        save_file(tensors, str(staging / WEIGHTS), metadata={"format": FORMAT})
        tokenizer, eos = quantized.tokenizer, None
        name = None
        if tokenizer is not None:
            eos = int(tokenizer.eos_id)
            name = "byte" if tokenizer.name == "byte" else TOKENIZER
            if name == TOKENIZER:
                shutil.copyfile(tokenizer.name, staging / TOKENIZER)
                for kept in CHAT_FILES:  # the chat template `jaxtrain serve` renders
                    source = Path(tokenizer.name).parent / kept
                    if source.is_file():
                        shutil.copyfile(source, staging / kept)
        meta = {
            "format": FORMAT,
            "bits": BITS,
            "symmetric": True,
            "group_size": quantized.group_size or None,
            "int8_weights": int8_paths(quantized.params),
            "tokenizer": name,
            "eos_id": eos,
            "model": dataclasses.asdict(quantized.model),
        }
        (staging / META).write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(staging, out)  # an empty ``out`` is replaced too
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _model_config(data: Any, where: str) -> ModelConfig:
    try:
        return model_from_dict(data)
    except UserError as err:
        raise UserError(f"{where}: bad model config ({err})") from None


def load_quantized(path: str) -> tuple[Quantized, Any]:
    """(the quantized model, its graphdef) from a ``jaxtrain quantize`` directory, every
    array on the default device, the int8 ones as int8.

    Raises:
        UserError: if ``path`` is not such a directory or its files do not match.
    """
    from jaxtrain import models

    directory = Path(path)
    meta_file = directory / META
    if not meta_file.is_file():
        raise UserError(
            f"--quantized: {path} is not a quantized model directory (no {META}; "
            "write one with jaxtrain quantize)"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--quantized: cannot read {meta_file}: {quote(err)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("bits") != BITS:
        raise UserError(f"--quantized: {meta_file} does not describe {FORMAT} weights")
    cfg = _model_config(meta.get("model"), str(meta_file))
    abstract = nnx.eval_shape(lambda: models.build(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    params = _read_params(directory / WEIGHTS, nnx.to_pure_dict(state))
    group_size = int(meta.get("group_size") or 0)
    return Quantized(cfg, params, group_size, _tokenizer(directory, meta)), graphdef


def _tokenizer(directory: Path, meta: dict) -> Tokenizer | None:
    name, eos = meta.get("tokenizer"), meta.get("eos_id")
    if name is None:
        return None
    if name == "byte":
        return load_tokenizer("byte")
    return load_tokenizer(str(directory / TOKENIZER), eos_id=-1 if eos is None else int(eos))


def _read_params(file: Path, abstract: Any) -> Any:
    """The tree shaped like ``abstract``, read from ``file``: an array, or a
    :class:`QuantizedWeight` where ``file`` has ``path/values`` and ``path/scale``."""
    try:
        reader = safe_open(str(file), framework="numpy")
    except (OSError, SafetensorError) as err:
        raise UserError(f"--quantized: cannot read {file}: {quote(err)}") from None
    with reader:
        names = set(reader.keys())
        used: set[str] = set()

        def read(path, leaf):
            name = path_str(path)
            parts = [name] if name in names else [f"{name}/values", f"{name}/scale"]
            missing = [p for p in parts if p not in names]
            if missing:
                raise UserError(f"--quantized: {file} has no tensor {missing[0]}")
            used.update(parts)
            arrays = [reader.get_tensor(p) for p in parts]
            if arrays[0].shape != tuple(leaf.shape):
                raise UserError(
                    f"--quantized: {parts[0]} in {file} has shape {arrays[0].shape}, the "
                    f"model needs {tuple(leaf.shape)}"
                )
            if len(arrays) == 1:
                return jnp.asarray(arrays[0])
            values, scale = arrays
            lead = scale.ndim - 2
            if (
                values.dtype != np.int8
                or scale.dtype != np.float32
                or lead < 0
                or scale.shape[:lead] != values.shape[:lead]
                or values.size % scale.size
            ):
                raise UserError(f"--quantized: {name} in {file} is not int8 with float32 scales")
            return QuantizedWeight(jnp.asarray(values), jnp.asarray(scale))

        params = jax.tree_util.tree_map_with_path(read, abstract)
    extra = sorted(names - used)
    if extra:
        raise UserError(f"--quantized: {file} has tensor {extra[0]}, which the model does not")
    return params

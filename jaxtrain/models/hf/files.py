"""Safetensors checkpoints, read a block at a time and written in size-capped shards.

Reading never unpickles: only ``*.safetensors`` files are opened (single, or sharded
with ``model.safetensors.index.json``); a directory with only ``.bin``/``.pt`` pickles is
refused. Each device's block of a parameter is read with ``safe_open(...).get_slice``
straight from the memory-mapped file, so host memory holds at most one block (one
layer's slice of one tensor) at a time, never the model.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxtrain.errors import UserError
from jaxtrain.models.hf.mapping import Source

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")


class Checkpoint(contextlib.AbstractContextManager):
    """The tensors of an HF model directory, by name, opened lazily as memory maps."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        elif (self.directory / SINGLE).is_file():
            self.files = self._names_of([self.directory / SINGLE])
        else:
            found = sorted(self.directory.glob("*.safetensors"))
            if not found:
                pickles = [p.name for g in PICKLES for p in sorted(self.directory.glob(g))]
                what = f"only pickled weights ({', '.join(pickles)})" if pickles else "no weights"
                raise UserError(
                    f"{directory}: {what}; jaxtrain reads safetensors only and never "
                    "unpickles: save the model with safetensors (transformers' "
                    "save_pretrained does by default) and try again"
                )
            self.files = self._names_of(found)
        self._stack = contextlib.ExitStack()
        self._open: dict[Path, Any] = {}

    @staticmethod
    def _names_of(files: Sequence[Path]) -> dict[str, Path]:
        names = {}
        for file in files:
            with safe_open(file, framework="np") as f:
                names |= dict.fromkeys(f.keys(), file)
        return names

    def _handle(self, name: str) -> Any:
        file = self.files[name]
        if file not in self._open:
            if not file.is_file():
                raise UserError(f"{self.directory}: {INDEX} names {file.name}, which is missing")
            self._open[file] = self._stack.enter_context(safe_open(file, framework="np"))
        return self._open[file]

    def resolve(self, name: str) -> str | None:
        """The stored name of ``name``: as is, or without the base-model prefix that
        checkpoints of a bare ``LlamaModel``/``GPT2Model`` (and the original GPT-2) lack,
        or with the ``gamma``/``beta`` LayerNorm names of checkpoints converted from
        TensorFlow (the original BERT)."""
        if name in self.files:
            return name
        for ours, theirs in ((".weight", ".gamma"), (".bias", ".beta")):
            legacy = name.removesuffix(ours) + theirs
            if "LayerNorm" in name and name.endswith(ours) and legacy in self.files:
                return legacy
        prefix, _, stripped = name.partition(".")
        return stripped if prefix in ("model", "transformer") and stripped in self.files else None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block ``index`` (step-1 slices) of tensor ``name``, read from disk."""
        return self._handle(name).get_slice(name)[index]

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def _ranges(index: tuple[slice, ...], shape: Sequence[int]) -> list[tuple[int, int]]:
    out = []
    for s, size in zip(index, shape, strict=True):
        start, stop, step = s.indices(size)
        assert step == 1, index
        out.append((start, stop))
    return out


def _read_one(ckpt: Checkpoint, name: str, src: Source, index: tuple[slice, ...]) -> np.ndarray:
    """Our block ``index`` of one (per-layer) HF tensor: read only the rows it needs.

    Each HF axis is split into a group of view axes; the leading axis of each group is
    read as a contiguous range and the inner ones are sliced in memory.
    """
    stored = ckpt.shape(name)
    if stored != src.hf:
        raise UserError(
            f"{ckpt.directory}: tensor {name} has shape {stored}, expected {src.hf} "
            "from config.json"
        )
    view = src.view_shape
    view_index = [slice(None)] * len(view)
    for ours, view_axis in enumerate(src.axes):  # our axis j is view axis axes[j]
        view_index[view_axis] = index[ours]
    ranges = _ranges(tuple(view_index), view)
    hf_index, block_shape, inner = [], [], []
    for hf_axis, group in enumerate(view_groups(src)):
        rows = math.prod(view[g] for g in group[1:])
        lo, hi = ranges[group[0]]
        offset = src.part[1] if src.part is not None and src.part[0] == hf_axis else 0
        hf_index.append(slice(offset + lo * rows, offset + hi * rows))
        block_shape += [hi - lo, *(view[g] for g in group[1:])]
        inner += [slice(None), *(slice(*ranges[g]) for g in group[1:])]
    block = ckpt.read(name, tuple(hf_index)).reshape(block_shape)[tuple(inner)]
    return block.transpose(src.axes)


def view_groups(src: Source) -> list[list[int]]:
    """For each axis of the HF part, the consecutive view axes it splits into."""
    view, groups, axis = src.view_shape, [], 0
    for size in src.part_shape:
        group = [axis]
        while math.prod(view[g] for g in group) < size:
            group.append(group[-1] + 1)
        assert math.prod(view[g] for g in group) == size, (src, size)
        groups.append(group)
        axis = group[-1] + 1
    assert axis == len(view), src
    return groups


def read_block(
    ckpt: Checkpoint, src: Source, index: tuple[slice, ...], shape: Sequence[int], dtype: Any
) -> np.ndarray:
    """Block ``index`` of our parameter of ``shape`` described by ``src``, as ``dtype``."""
    if not src.layered:
        return np.asarray(_read_one(ckpt, src.names[0], src, index), dtype=dtype)
    n = src.stacked  # leading axes: layers, or layers and experts
    spans = [range(lo, hi) for lo, hi in _ranges(index[:n], shape[:n])]
    rest = index[n:]
    out = None
    for j, where in enumerate(itertools.product(*spans)):
        flat = where[0] * src.experts + where[1] if src.experts else where[0]
        block = _read_one(ckpt, src.names[flat], src, rest)
        if out is None:
            out = np.empty((math.prod(map(len, spans)), *block.shape), dtype)
        out[j] = block
    return out.reshape(*map(len, spans), *out.shape[1:])


def place(
    shape: Sequence[int],
    dtype: Any,
    sharding: jax.sharding.Sharding,
    read: Callable[[tuple[slice, ...]], np.ndarray],
) -> jax.Array:
    """A global array in ``sharding`` whose blocks come from ``read(index)``.

    Like ``jax.make_array_from_callback``, but a block that several devices hold
    (replicated axes) is read once, and each block is put on its devices before the
    next is read, so host memory holds one block at a time.
    """
    shape = tuple(shape)
    by_block: dict[tuple, tuple[tuple[slice, ...], list]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(_ranges(index, shape))
        by_block.setdefault(key, (index, []))[1].append(device)
    shards = []
    for index, devices in by_block.values():
        block = np.ascontiguousarray(read(index), dtype=dtype)
        shards += [jax.device_put(block, device) for device in devices]
        del block
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def write_shards(
    directory: Path,
    tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    fetch: Callable[[str], np.ndarray],
    max_shard_bytes: int,
) -> list[Path]:
    """Write ``tensors`` (name, shape, dtype), each made by ``fetch(name)`` when its file
    is written, into safetensors files of at most ``max_shard_bytes`` (one tensor larger
    than that gets a file of its own), with ``model.safetensors.index.json`` when there is
    more than one file. Returns the files written."""
    shards: list[list[tuple[str, int]]] = [[]]
    size = 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, nbytes))
        size += nbytes
    if len(shards) == 1:
        names = [SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(names, shards, strict=True):
        save_file({name: fetch(name) for name, _ in shard}, directory / file, {"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(n for shard in shards for _, n in shard)},
            "weight_map": {
                name: file for file, shard in zip(names, shards, strict=True) for name, _ in shard
            },
        }
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / n for n in names]


def iter_layers(src: Source) -> Iterator[tuple[int | tuple[int, int] | None, str]]:
    """(the index of its block in our parameter: a layer, (layer, expert) or None; HF
    name) for each tensor of a source."""
    if src.experts:
        yield from ((divmod(i, src.experts), name) for i, name in enumerate(src.names))
    elif src.layered:
        yield from enumerate(src.names)
    else:
        yield None, src.names[0]

"""Finding and reading a config file: a YAML path, or the name of a config shipped in
the package (``jaxtrain train llama3-8b`` works from an installed wheel).

Every way a file can be wrong (missing, a directory, not UTF-8, not YAML, a key given
twice, too big to be a config) is one :class:`~jaxtrain.errors.UserError` line naming
the file.
"""

from __future__ import annotations

import os
import stat
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from jaxtrain.errors import UserError, quote

SIZE_LIMIT = 1 << 20  # bytes; a config is a page of YAML, a bigger file is a mistake


class DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping gives one key twice."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: PyYAML would
    silently keep the last, so a config could say one thing and train another. Keys
    brought in by a merge (``<<: *base``) may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise DuplicateKey(None, None, f"duplicate key {quote(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """``text`` as YAML plain data (safe tags only), refusing duplicate keys."""
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: plain data only


def shipped_configs() -> list[str]:
    """The names of the configs shipped inside the package (``jaxtrain train NAME``)."""
    folder = resources.files("jaxtrain") / "configs"
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _config_file(path: str) -> tuple[Any, str]:
    """The file ``path`` names (a YAML file, or a shipped config's bare name) and how
    messages show it.

    Raises:
        UserError: for a path that does not exist, is a directory or cannot be read.
    """
    shown = quote(path, 120)
    file = Path(path)
    try:
        info = file.stat()
    except FileNotFoundError:
        info = None
    except OSError as err:  # a name too long, a file where a folder should be, no access
        raise UserError(f"config file {shown}: cannot read it ({err.strerror or err})") from None
    if info is None:
        name = path.removesuffix(".yaml")
        separators = [s for s in (os.sep, os.altsep) if s]
        names = shipped_configs()
        if not name or any(s in path for s in separators):
            base = file.name.removesuffix(".yaml")
            hint = f" (the shipped one is {base})" if base in names else ""
            raise UserError(f"config file {shown} does not exist{hint}")
        if name not in names:
            raise UserError(
                f"config file {shown} does not exist, nor is it a shipped config "
                f"(shipped: {', '.join(names)})"
            )
        return resources.files("jaxtrain") / "configs" / f"{name}.yaml", shown
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"config file {shown} is a directory; give a YAML file")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"config file {shown} is not a regular file; give a YAML file")
    if info.st_size > SIZE_LIMIT:
        raise UserError(
            f"config file {shown} is {info.st_size / 2**20:.1f} MiB; a config is a small YAML file"
        )
    return file, shown


def _read(file: Any, shown: str) -> dict[str, Any]:
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise UserError(f"config file {shown}: cannot read it ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(
            f"config file {shown}: not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line})"
        ) from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        if isinstance(err, DuplicateKey):
            raise UserError(
                f"config file {shown}: {err.problem}{where}; give each key once"
            ) from None
        raise UserError(f"config file {shown}: not valid YAML{where}") from None
    except RecursionError:
        raise UserError(f"config file {shown}: not valid YAML (nested too deeply)") from None
    except ValueError as err:  # a number over 4300 digits, a date like 2024-13-45
        raise UserError(f"config file {shown}: not valid YAML ({quote(str(err))})") from None
    if data is None:
        # Allowed (the defaults are a complete config), but rarely what was meant.
        print(f"jaxtrain: note: config file {shown} is empty; using the defaults", file=sys.stderr)
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {shown}: top level must be a mapping")
    return data


def read_config(path: str) -> dict[str, Any]:
    """The plain data of the config ``path`` names (``{}`` for an empty file, with a
    note on stderr).

    Raises:
        UserError: for a file that is missing, unreadable or not a YAML mapping.
    """
    return _read(*_config_file(path))

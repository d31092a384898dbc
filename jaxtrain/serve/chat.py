"""Chat messages to a prompt with the model directory's own chat template.

A Hugging Face model directory keeps its template in ``chat_template.jinja`` or under
``chat_template`` in ``tokenizer_config.json`` (a string, or a list of named templates of
which ``default`` is used). It is rendered as transformers renders it: a sandboxed Jinja
environment, ``messages``, ``add_generation_prompt=True``, the special tokens of
``tokenizer_config.json`` and ``raise_exception`` for the template's own checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxtrain.errors import UserError


class TemplateError(ValueError):
    """The template refused the messages (its ``raise_exception``) or failed on them."""


class ChatTemplate:
    """A compiled chat template and the special tokens it may print."""

    def __init__(self, source: str, special: dict[str, str], where: str):
        from jinja2 import TemplateError as JinjaError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(source)
        except JinjaError as err:
            raise UserError(f"chat template: {where} does not compile ({err})") from None
        self.special = special

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for ``messages`` with the assistant's turn opened."""
        from jinja2 import TemplateError as JinjaError

        try:
            return self.template.render(
                messages=messages, add_generation_prompt=True, **self.special
            )
        except JinjaError as err:
            raise TemplateError(str(err)) from None


def _raise(message: str) -> None:
    raise TemplateError(message)


def load_chat_template(directory: Path | None) -> ChatTemplate | None:
    """The chat template kept in ``directory``, or None when it has none.

    Raises:
        UserError: a template file that cannot be read or compiled.
    """
    if directory is None:
        return None
    config = _tokenizer_config(directory / "tokenizer_config.json")
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            source, where = jinja.read_text(encoding="utf-8"), str(jinja)
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"chat template: cannot read {jinja} ({err})") from None
    else:
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        where = str(directory / "tokenizer_config.json")
    if not isinstance(source, str) or not source:
        return None
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str):
            special[key] = token
    return ChatTemplate(source, special, where)


def _tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"chat template: cannot read {path} ({err})") from None
    return config if isinstance(config, dict) else {}

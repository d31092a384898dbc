"""The OpenAI API's request bodies as the server accepts them, and its JSON error body.

Requests are validated strictly: an unknown field (including the OpenAI options this
server does not implement, such as ``logprobs``), a value of the wrong type (``"8"`` for
``max_tokens``) or out of range is a 400 with an OpenAI-style error naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4  # stop strings per request, as the OpenAI API allows


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    """``{"error": {...}}`` as the OpenAI API answers a failed request."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class Sampling(_Strict):
    """What both endpoints take besides the prompt."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: Any) -> Any:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"give at most {MAX_STOP} non-empty stop strings")
        return stop

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(Sampling):
    """``POST /v1/completions``: one prompt (a string, or a list holding one)."""

    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("give one prompt (n=1 and one prompt per request)")
        return prompt

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(Sampling):
    """``POST /v1/chat/completions``: the conversation so far."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

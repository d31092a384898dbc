"""The HTTP API: OpenAI's completions and chat completions, models, health and metrics.

``create_app(state)`` builds the FastAPI application over a :class:`ServerState`. The
generation endpoints turn a request into a :class:`~jaxtrain.serve.scheduler.Request`,
whose updates the scheduler thread hands to this event loop; they answer with the whole
text, or with ``stream: true`` as server-sent events (one chunk per piece of text, a
final chunk with the finish reason, then ``data: [DONE]``). A client that goes away
frees its decode row at the next step.

Every failure is a JSON error body with the right status: 400 for a bad request (the
field named), 401 without the ``--api-key``, 404 for another model's name, 429 when the
waiting queue is full, 503 before the programs are compiled, 500 if a step fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest

from jaxtrain.serve.chat import ChatTemplate, TemplateError
from jaxtrain.serve.metrics import Metrics
from jaxtrain.serve.protocol import ChatRequest, CompletionRequest, Sampling, error_body
from jaxtrain.serve.scheduler import QueueFull, Request, Scheduler, Update

DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens, as the OpenAI API
DISCONNECT_POLL = 0.5  # seconds between checks that a waiting client is still there


@dataclasses.dataclass
class ServerState:
    """What the endpoints serve: the model's name and tokenizer, its limits, and the
    scheduler once the programs are compiled."""

    name: str
    tokenizer: Any
    max_len: int
    metrics: Metrics
    chat_template: ChatTemplate | None = None
    api_key: str | None = None
    scheduler: Scheduler | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    ready: threading.Event = dataclasses.field(default_factory=threading.Event)


class APIError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, kind: str, param=None, code=None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param, code)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="jaxtrain", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_, err: APIError):
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, err: RequestValidationError):
        problem = err.errors()[0]
        where = [str(p) for p in problem.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        message = problem.get("msg", "invalid request")
        if problem.get("type") == "extra_forbidden":
            message = "unknown or unsupported field"
        elif problem.get("type") == "json_invalid":
            message = "the body is not valid JSON (UTF-8)"
        text = f"{param}: {message}" if param else message
        return JSONResponse(error_body(text, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_, err: HTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code)

    @app.middleware("http")
    async def _guard(request: HTTPRequest, call_next):
        path = request.url.path
        if state.api_key is not None and path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                response = JSONResponse(
                    error_body("missing or wrong API key (Authorization: Bearer KEY)",
                               "authentication_error", code="invalid_api_key"),
                    status_code=401,
                )  # fmt: skip
                state.metrics.requests.labels(path, "401").inc()
                return response
        response = await call_next(request)
        state.metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        if not state.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        card = {"id": state.name, "object": "model", "created": state.created,
                "owned_by": "jaxtrain", "max_model_len": state.max_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        ids = _encode(state, body.text, "prompt")
        limit = body.max_tokens or DEFAULT_MAX_TOKENS
        return await _generate(state, http, body, ids, limit, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        if state.chat_template is None:
            raise APIError(
                400, f"model {state.name} has no chat template (chat_template.jinja or "
                "tokenizer_config.json's chat_template in its directory); use /v1/completions",
                "invalid_request_error", "messages", "no_chat_template",
            )  # fmt: skip
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            prompt = state.chat_template.render(messages)
        except TemplateError as err:
            raise APIError(400, f"messages: {err}", "invalid_request_error", "messages") from None
        ids = _encode(state, prompt, "messages")
        limit = body.limit or state.max_len - len(ids)
        return await _generate(state, http, body, ids, limit, chat=True)

    return app


def _encode(state: ServerState, text: str, param: str):
    if not text:
        raise APIError(400, f"{param}: empty", "invalid_request_error", param)
    return state.tokenizer.encode(text)


async def _generate(state: ServerState, http: HTTPRequest, body: Sampling, ids, limit: int,
                    *, chat: bool):  # fmt: skip
    scheduler = state.scheduler
    if not state.ready.is_set() or scheduler is None:
        raise APIError(503, "the model is still compiling; retry when /health is ok",
                       "server_error", code="loading")  # fmt: skip
    if body.model is not None and body.model != state.name:
        raise APIError(404, f"model: {body.model} is not served here (this is {state.name})",
                       "not_found_error", "model", "model_not_found")  # fmt: skip
    if len(ids) + limit > state.max_len:
        raise APIError(
            400, f"the prompt's {len(ids)} tokens and max_tokens={limit} need "
            f"{len(ids) + limit} positions; this server's context is {state.max_len} "
            f"(--max-len)", "invalid_request_error", "max_tokens", "context_length_exceeded",
        )  # fmt: skip
    if limit < 1:
        raise APIError(400, f"the prompt's {len(ids)} tokens fill the {state.max_len}-token "
                       "context", "invalid_request_error", "messages",
                       "context_length_exceeded")  # fmt: skip
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[Update] = asyncio.Queue()
    request = Request(
        prompt=ids, max_tokens=limit,
        sink=lambda update: loop.call_soon_threadsafe(updates.put_nowait, update),
        temperature=body.temperature, top_p=body.top_p,
        seed=(secrets.randbits(31) if body.seed is None else body.seed) % 2**31,
        stop=body.stops,
    )  # fmt: skip
    try:
        scheduler.submit(request)
    except QueueFull:
        raise APIError(429, "too many requests waiting; retry later", "rate_limit_error",
                       code="queue_full") from None  # fmt: skip
    state.metrics.prompt.inc(len(ids))
    reply = _Reply(state.name, chat, len(ids))
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            _stream(request, updates, reply, usage), media_type="text/event-stream"
        )
    text = []
    async for update in _updates(request, updates, http):
        text.append(update.text)
        if update.finish_reason == "error":
            raise APIError(500, "generation failed on the device; see the server's log",
                           "server_error")  # fmt: skip
        if update.finish_reason is not None:
            return reply.whole("".join(text), update)
    return Response(status_code=499)  # the client went away


async def _updates(request: Request, updates: asyncio.Queue, http: HTTPRequest | None):
    """The request's updates until it finishes; cancels it if the client goes away (checked
    every DISCONNECT_POLL s, or when the response stream is torn down)."""
    try:
        while True:
            try:
                update = await asyncio.wait_for(updates.get(), DISCONNECT_POLL)
            except TimeoutError:
                if http is not None and await http.is_disconnected():
                    return
                continue
            yield update
            if update.finish_reason is not None:
                return
    finally:
        request.cancel()


async def _stream(request: Request, updates: asyncio.Queue, reply: _Reply,
                  usage: bool) -> AsyncIterator[str]:  # fmt: skip
    opening = reply.chunk(first=True)
    if opening:
        yield opening
    async for update in _updates(request, updates, None):
        if update.text:
            yield reply.chunk(text=update.text)
        if update.finish_reason == "error":
            yield _sse(error_body("generation failed on the device", "server_error"))
        elif update.finish_reason is not None:
            yield reply.chunk(finish=update.finish_reason)
            if usage:
                yield reply.chunk(usage=update)
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Reply:
    """The response objects of one request: ``text_completion`` or ``chat.completion``."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int):
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _usage(self, update: Update) -> dict:
        done = update.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}  # fmt: skip

    def _envelope(self, kind: str, choices: list) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def whole(self, text: str, update: Update) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": update.finish_reason, "logprobs": None}  # fmt: skip
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "finish_reason": update.finish_reason,
                      "logprobs": None}  # fmt: skip
            body = self._envelope("text_completion", [choice])
        return body | {"usage": self._usage(update)}

    def chunk(self, *, text: str = "", finish: str | None = None, first: bool = False,
              usage: Update | None = None) -> str:  # fmt: skip
        """One server-sent event. Chat streams open with the assistant's role; a plain
        completion's first event is skipped (empty)."""
        if usage is not None:
            kind = "chat.completion.chunk" if self.chat else "text_completion"
            return _sse(self._envelope(kind, []) | {"usage": self._usage(usage)})
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return _sse(self._envelope("chat.completion.chunk", [choice]))
        if first:
            return ""
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return _sse(self._envelope("text_completion", [choice]))

"""``jaxtrain serve``: load a model, listen, compile, then answer until SIGTERM.

The socket is bound first (a port in use is a one-line error, not a traceback), so
``/health`` answers 503 while the engine's programs compile on a background thread and
200 once they are ready. SIGTERM or Ctrl-C stops accepting connections, lets the
requests in flight finish (at most ``shutdown_timeout`` seconds), stops the scheduler and
exits 0.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from jaxtrain.errors import UserError

SERVABLE = ("llama", "gpt2")  # decoder-only families (+ Mistral, Qwen2/3) with a KV cache
DEFAULT_MAX_LEN = 2048


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """The command line of ``jaxtrain serve``."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_len: int | None = None
    max_queue: int = 64
    prefill_chunk: int = 256
    api_key: str | None = None
    name: str | None = None
    shutdown_timeout: float = 30.0


def check_options(opts: ServeOptions) -> None:
    for flag, value in (("--max-batch", opts.max_batch), ("--prefill-chunk", opts.prefill_chunk),
                        ("--max-queue", opts.max_queue)):  # fmt: skip
        if value < 1:
            raise UserError(f"{flag}: must be positive, not {value}")
    if opts.max_len is not None and opts.max_len < 2:
        raise UserError(f"--max-len: must be at least 2, not {opts.max_len}")
    if not 0 <= opts.port <= 65535:
        raise UserError(f"--port: {opts.port} is not a TCP port")
    if opts.api_key is not None and not opts.api_key:
        raise UserError("--api-key: empty")


def model_limit(generator: Any, max_len: int | None, where: str) -> int:
    """The context the server gives each request: ``--max-len``, at most what the model
    can encode, by default ``min(model.max_seq_len, DEFAULT_MAX_LEN)``."""
    from jaxtrain.models import FAMILIES

    cfg = generator.model
    if cfg.family not in SERVABLE:
        raise UserError(
            f"{where}: serving is implemented for the decoder-only families "
            f"({', '.join(SERVABLE)}), not model.family={cfg.family}"
        )
    limit = FAMILIES[cfg.family].max_positions(cfg)
    if max_len is None:
        return min(limit or cfg.max_seq_len, DEFAULT_MAX_LEN)
    if limit is not None and max_len > limit:
        raise UserError(
            f"--max-len: {max_len}; {cfg.family} has learned positions and "
            f"model.max_seq_len={limit}"
        )
    return max_len


def template_dir(generator: Any, source: Path) -> Path | None:
    """Where a chat template may be: the model directory, or a run's tokenizer's."""
    name = getattr(generator.tokenizer, "name", None)
    if name and Path(name).is_file():
        return Path(name).parent
    return source if source.is_dir() else None


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"--port: cannot listen on {host}:{port} ({err.strerror})") from None
    sock.set_inheritable(True)
    return sock


def serve(generator: Any, source: Path, opts: ServeOptions) -> int:
    """Serve ``generator``'s model (loaded from ``source``) until SIGTERM; returns 0.
    ``opts`` have passed :func:`check_options` (before the model was loaded)."""
    import uvicorn

    from jaxtrain.serve.app import ServerState, create_app
    from jaxtrain.serve.chat import load_chat_template
    from jaxtrain.serve.engine import Engine
    from jaxtrain.serve.metrics import Metrics
    from jaxtrain.serve.scheduler import Scheduler

    max_len = model_limit(generator, opts.max_len, "--run/--hf/--quantized")
    state = ServerState(
        name=opts.name or source.resolve().name,
        tokenizer=generator.tokenizer,
        max_len=max_len,
        metrics=Metrics(),
        chat_template=load_chat_template(template_dir(generator, source)),
        api_key=opts.api_key,
    )
    sock = bind(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    print(f"jaxtrain: serving {state.name} on http://{host}:{port} (compiling)", flush=True)
    failed: list[BaseException] = []
    config = uvicorn.Config(
        create_app(state), log_level="warning", access_log=False, lifespan="off",
        timeout_graceful_shutdown=opts.shutdown_timeout,
    )  # fmt: skip
    server = uvicorn.Server(config)

    def start() -> None:
        try:
            engine = Engine(
                generator.graphdef, generator.params, max_batch=opts.max_batch,
                max_len=max_len, chunk=opts.prefill_chunk,
            )  # fmt: skip
            engine.compile()
            state.scheduler = Scheduler(
                engine, generator.tokenizer, max_queue=opts.max_queue, metrics=state.metrics
            )
            state.scheduler.start()
        except BaseException as err:  # reported below, after the server stops
            failed.append(err)
            server.should_exit = True
            return
        state.ready.set()
        print(f"jaxtrain: ready on http://{host}:{port}", flush=True)

    threading.Thread(target=start, name="jaxtrain-compile", daemon=True).start()
    # uvicorn handles SIGTERM/SIGINT (stop accepting, finish in-flight requests), then
    # raises the signal again once done: these handlers let that second one pass quietly.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if state.scheduler is not None:
            state.scheduler.stop()
    if failed:
        err = failed[0]
        if isinstance(err, UserError):
            raise err
        raise UserError(f"serve: the engine could not start ({type(err).__name__}: {err})")
    print("jaxtrain: server stopped", file=sys.stderr, flush=True)
    return 0

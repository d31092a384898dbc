"""Continuous batching: requests wait in a bounded queue and take a decode row between steps.

One thread owns the :class:`~jaxtrain.serve.engine.Engine`. Each turn of its loop it
frees the rows of finished or abandoned requests, admits waiting requests into free rows,
reads one prefill chunk of the oldest request still reading its prompt (so a long prompt
delays the running requests by one chunk per step, not by its whole length), then runs
one decode step for every row that is generating. A request hears of its text through
its ``sink``, called on this thread with :class:`Update` s: the new text as tokens
arrive (held back while a token ends mid-character), then one update with the reason it
finished.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxtrain.generate.api import TextStream, cut_at_stop
from jaxtrain.serve.engine import Engine
from jaxtrain.serve.metrics import Metrics

log = logging.getLogger("jaxtrain.serve")


class QueueFull(Exception):
    """Every row is busy and the waiting queue is at its bound."""


@dataclasses.dataclass(frozen=True)
class Update:
    """What a request hears: new text, and at the end why it finished.

    Attributes:
        text: text generated since the last update.
        finish_reason: None while running; then "stop" (EOS or a stop string), "length"
            (max_tokens reached) or "error".
        completion_tokens: tokens generated so far.
    """

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclasses.dataclass(eq=False)
class Request:
    """One completion: its prompt ids, how to sample, where its updates go.

    ``max_tokens`` plus the prompt's length must fit the engine's ``max_len`` (the API
    checks before submitting).
    """

    prompt: np.ndarray
    max_tokens: int
    sink: Callable[[Update], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False
    # Set while it runs: its row, its next slot, tokens generated, their text.
    row: int = -1
    read: int = 0
    generated: int = 0
    last_token: int = 0
    last_time: float = 0.0
    text: TextStream | None = None

    def cancel(self) -> None:
        """The client went away: free the row at the next step."""
        self.cancelled = True

    @property
    def sampling(self) -> tuple[int, float, float]:
        return self.seed, self.temperature, self.top_p


class Scheduler:
    """Admits requests into the engine's rows and runs its steps on its own thread.

    Args:
        engine: a compiled engine.
        tokenizer: decodes the generated ids (``eos_id`` ends a request).
        max_queue: the most requests that may wait for a row; more raise QueueFull.
        metrics: where queue length, occupancy, token counts and latencies go.
    """

    def __init__(self, engine: Engine, tokenizer, *, max_queue: int, metrics: Metrics):
        self.engine, self.tokenizer, self.metrics = engine, tokenizer, metrics
        self.max_queue = max_queue
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[Request | None] = [None] * engine.max_batch
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="jaxtrain-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step; requests still running finish as "error"."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def submit(self, request: Request) -> None:
        """Queue ``request``; raises QueueFull when ``max_queue`` are already waiting
        besides those about to take the free rows."""
        with self._wake:
            if len(self.waiting) >= self.max_queue + self.rows.count(None):
                raise QueueFull
            self.waiting.append(request)
            self.metrics.queue.set(len(self.waiting))
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._has_work():
                    self._wake.wait()
                if self._stopping:
                    break
                self._admit()
            try:
                self._prefill()
                self._decode()
            except Exception:  # a failed step must not take the server down with it
                log.exception("serving step failed")
                for request in self.rows:
                    if request is not None:
                        self._finish(request, "error")
        for request in [*self.rows, *self.waiting]:
            if request is not None:
                self._finish(request, "error")

    def _has_work(self) -> bool:
        running = any(r is not None for r in self.rows)
        return running or (bool(self.waiting) and None in self.rows)

    def _admit(self) -> None:
        for held in self.rows:
            if held is not None and held.cancelled:
                self._release(held)
        self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
        while self.waiting and None in self.rows:
            request = self.waiting.popleft()
            row = self.rows.index(None)
            request.row, self.rows[row] = row, request
            request.text = TextStream(
                self.tokenizer, 1, self.tokenizer.eos_id, request.stop,
                lambda _, piece, request=request: request.sink(
                    Update(piece, completion_tokens=request.generated)
                ),
            )  # fmt: skip
        self.metrics.queue.set(len(self.waiting))
        self._count_occupancy()

    def _prefill(self) -> None:
        """One chunk of the request that has read the least of its prompt's earliest
        arrival."""
        reading = [r for r in self.rows if r is not None and r.read < len(r.prompt)]
        if not reading:
            return
        request = min(reading, key=lambda r: r.arrived)
        chunk = request.prompt[request.read : request.read + self.engine.buckets[-1]]
        token = self.engine.prefill(request.row, chunk, request.read, request.sampling)
        request.read += len(chunk)
        if request.read == len(request.prompt):
            now = time.monotonic()
            self.metrics.ttft.observe(now - request.arrived)
            self._emit(request, token, now)

    def _decode(self) -> None:
        rows = [
            r for r in self.rows if r is not None and r.read == len(r.prompt) and not r.cancelled
        ]
        if not rows:
            return
        n = self.engine.rows_for(max(r.row for r in rows))
        tokens, index = np.zeros(n, np.int32), np.zeros(n, np.int32)
        slots = np.full(n, self.engine.idle_slot, np.int32)
        seeds = np.zeros(n, np.int32)
        temperature, top_p = np.zeros(n, np.float32), np.ones(n, np.float32)
        for r in rows:
            tokens[r.row], index[r.row] = r.last_token, r.generated
            slots[r.row] = len(r.prompt) + r.generated - 1
            seeds[r.row], temperature[r.row], top_p[r.row] = r.sampling
        out = self.engine.decode(tokens, slots, index, (seeds, temperature, top_p))
        now = time.monotonic()
        for r in rows:
            self.metrics.itl.observe(now - r.last_time)
            self._emit(r, int(out[r.row]), now)

    def _emit(self, request: Request, token: int, now: float) -> None:
        """Hand ``token`` (the request's next) to its text; finish it on EOS, a stop
        string or its last token."""
        request.generated += 1
        request.last_token, request.last_time = token, now
        self.metrics.record_tokens(1, now)
        if token == self.tokenizer.eos_id:
            self._finish(request, "stop")
            return
        request.text.add(np.asarray([token]))
        if request.text.done[0]:
            self._finish(request, "stop")
        elif request.generated >= request.max_tokens:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str) -> None:
        if request.text is not None:
            ids = request.text.ids[0]
            request.text.finish([cut_at_stop(self.tokenizer.decode(ids), request.stop)])
        request.sink(Update(finish_reason=reason, completion_tokens=request.generated))
        self._release(request)

    def _release(self, request: Request) -> None:
        if 0 <= request.row < len(self.rows) and self.rows[request.row] is request:
            self.rows[request.row] = None
        self._count_occupancy()

    def _count_occupancy(self) -> None:
        self.metrics.occupancy.set(sum(r is not None for r in self.rows) / len(self.rows))

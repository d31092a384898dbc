"""Bounded prefetch: the batches of the next steps are built in a background thread while
the current step runs.

A batch's host work (cutting windows, the objective, the packing boundaries) and its
placement on the devices (``jax.make_array_from_process_local_data``) overlap the step
running on the devices, as ``tf.data``'s ``prefetch`` does (Murray et al., 2021, "tf.data:
A Machine Learning Data Processing Framework") and flax's ``prefetch_to_device``. Batches
stay a pure function of (seed, step): the thread builds the steps of one range in order,
the loop takes them in that order, and a resumed run starts a new range at its first
step, so prefetching changes when a batch is built, never which one.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# How long close() waits for a batch still being built. The thread is a daemon and drops
# whatever it builds after close(), so a stuck build (a hung file system) can neither keep
# the process alive at exit nor hang the loop's shutdown.
JOIN_TIMEOUT_S = 60.0


class Prefetcher(Generic[T]):
    """``make(step)`` for the steps ``start, start + 1, ..., stop - 1``, built up to
    ``depth`` steps ahead of the one the caller is using, in a background thread.

    Use it as a context manager (or call :meth:`close`), so the thread stops on every way
    out of the loop: the end, an exception, a stop signal. An exception raised by
    ``make(step)`` is raised again, the same object, by ``get(step)``: where and when the
    synchronous loop would have raised it. ``depth=0`` starts no thread and builds each
    batch in :meth:`get`.
    """

    def __init__(self, make: Callable[[int], T], start: int, stop: int, depth: int = 2):
        """Starts building ``make(start)``.

        Args:
          make: builds the batch of a step (``Loader.train_batch``); called in order,
            from one thread.
          start: the first step :meth:`get` will ask for.
          stop: one past the last step.
          depth: batches built ahead (each held in device memory until used); 0: none.

        Raises:
          ValueError: ``depth`` is negative.
        """
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._make, self._stop, self._depth = make, stop, depth
        self._next = start  # the step get() hands out next
        # (step, batch, error) of the built batches, oldest first; at most `depth`.
        self._ready: collections.deque[tuple[int, Any, BaseException | None]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = self._finished = False
        self._thread: threading.Thread | None = None
        if depth and start < stop:
            self._thread = threading.Thread(
                target=self._work, args=(start,), name="jaxtrain-prefetch", daemon=True
            )
            self._thread.start()

    def get(self, step: int) -> T:
        """The batch of ``step``, which must be the step after the previous call's.

        Raises:
          ValueError: ``step`` is out of order or past the range: prefetching never skips
            or reorders batches.
          RuntimeError: the prefetcher is closed, or its thread stopped after an error.
          Exception: whatever ``make(step)`` raised.
        """
        if self._closed:
            raise RuntimeError("the prefetcher is closed")
        if step != self._next or step >= self._stop:
            raise ValueError(
                f"prefetch: asked for the batch of step {step}; the next one is {self._next} "
                f"(of steps up to {self._stop - 1})"
            )
        self._next += 1
        if self._thread is None:
            return self._make(step)
        with self._cond:
            while not self._ready:
                if self._finished:
                    raise RuntimeError("the prefetch thread stopped after an error")
                self._cond.wait()
            built, batch, error = self._ready.popleft()
            self._cond.notify_all()  # room for the next batch
        assert built == step, (built, step)
        if error is not None:
            raise error
        return batch

    def _work(self, start: int) -> None:
        try:
            for step in range(start, self._stop):
                with self._cond:
                    while len(self._ready) >= self._depth and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                try:
                    item = (step, self._make(step), None)
                except BaseException as error:  # raised again, in the caller, by get()
                    item = (step, None, error)
                with self._cond:
                    if self._closed:
                        return
                    self._ready.append(item)
                    self._cond.notify_all()
                if item[2] is not None:
                    return
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def close(self) -> None:
        """Stop the thread and drop the batches built ahead; safe to call twice."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

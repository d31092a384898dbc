"""Prefetching changes when a batch is built, never which one: the same batches in the
same order as building them between steps, from any resume step; a failed build raises
its own error in the caller; the thread ends on every way out."""

import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from rich.console import Console
from tiny import TINY

from jaxtrain import config
from jaxtrain.data import Loader, Prefetcher, TokenDataset
from jaxtrain.errors import UserError
from jaxtrain.train import loop
from jaxtrain.train.loop import train

THREAD = "jaxtrain-prefetch"


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == THREAD]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    assert not prefetch_threads()
    yield
    assert not prefetch_threads()


@pytest.fixture(scope="module")
def loader():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 257, 5000).astype(np.uint16)
    tokens[rng.random(5000) < 0.05] = 0
    ds = TokenDataset(train=tokens, validation=tokens[:600], vocab_size=257, eos_id=0, source="t")
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    return Loader(ds, seed=3, global_batch=16, seq_len=32, sharding=sharding, packing=True)


def assert_same_batch(got, want):
    assert got.keys() == want.keys()
    for key, value in got.items():
        assert value.sharding == want[key].sharding and value.dtype == want[key].dtype
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[key]))


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("start", [0, 5])  # 5: a run resumed at step 5
def test_prefetched_batches_are_the_synchronous_ones(loader, depth, start):
    with Prefetcher(loader.train_batch, start, 9, depth) as batches:
        assert len(prefetch_threads()) == (1 if depth else 0)
        for step in range(start, 9):
            assert_same_batch(batches.get(step), loader.train_batch(step))
    for step in range(start, 9):  # and different steps are different batches
        assert not np.array_equal(
            np.asarray(loader.train_batch(step)["inputs"]),
            np.asarray(loader.train_batch(step + 1)["inputs"]),
        )


def test_steps_are_taken_in_order_and_within_the_range():
    with Prefetcher(lambda step: step, 2, 5) as batches:
        with pytest.raises(ValueError, match="step 3; the next one is 2"):
            batches.get(3)  # no skipping
        assert [batches.get(s) for s in (2, 3, 4)] == [2, 3, 4]
        with pytest.raises(ValueError, match="step 5; the next one is 5 .*up to 4"):
            batches.get(5)
    with pytest.raises(RuntimeError, match="closed"):
        batches.get(5)
    with pytest.raises(ValueError, match="depth must be >= 0"):
        Prefetcher(lambda step: step, 0, 5, depth=-1)


def test_builds_at_most_depth_ahead():
    built = []
    with Prefetcher(built.append, 0, 100, depth=3) as batches:
        batches.get(0)

        def settled():
            time.sleep(0.05)
            return len(built)

        deadline = time.monotonic() + 10
        while settled() < 4 and time.monotonic() < deadline:
            pass
        assert settled() == 4 and built == [0, 1, 2, 3]  # step 0 used, 1..3 ahead
        batches.get(1)
        while settled() < 5 and time.monotonic() < deadline:
            pass
        assert built == [0, 1, 2, 3, 4]


def test_a_failed_build_raises_its_own_error_at_its_step():
    error = UserError("data.path: tokens.bin is unreadable")

    def make(step):
        if step == 3:
            raise error
        return step

    with Prefetcher(make, 0, 10, depth=2) as batches:
        assert [batches.get(s) for s in range(3)] == [0, 1, 2]  # the batches before it
        with pytest.raises(UserError) as raised:
            batches.get(3)
        assert raised.value is error
        assert any(frame.name == "make" for frame in raised.traceback)  # where it failed
        with pytest.raises(RuntimeError, match="stopped after an error"):
            batches.get(4)  # never a hang


def test_closing_stops_a_thread_that_waits_or_builds():
    with Prefetcher(lambda step: step, 0, 100, depth=1):
        time.sleep(0.05)  # the thread fills its one slot and waits
    started = threading.Event()

    def slow(step):
        started.set()
        time.sleep(0.3)
        return step

    batches = Prefetcher(slow, 0, 100, depth=4)
    started.wait(10)
    batches.close()  # waits out the build in progress, builds no more
    assert not prefetch_threads()
    batches.close()  # twice is fine


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_exception_in_the_loop_stops_the_thread(interrupt):
    with pytest.raises(interrupt), Prefetcher(lambda step: step, 0, 100) as batches:
        batches.get(0)
        raise interrupt()


def test_prefetch_key_is_checked():
    with pytest.raises(UserError, match="^data.prefetch: must be >= 0"):
        config.load(None, ["data.prefetch=-1"])


def test_the_loop_trains_on_the_synchronous_batches_and_resumes_them(tmp_path, monkeypatch):
    """The loop prefetching 3 batches, stopped at step 3 and resumed with prefetching off,
    trains on the batches of steps 0..4 in order, each the one built between steps."""
    seen = []

    class Recording(Prefetcher):
        def __init__(self, make, start, stop, depth):
            super().__init__(make, start, stop, depth)
            self.make, self.depth = make, depth

        def get(self, step):
            batch = super().get(step)
            seen.append((self.depth, step, jax.device_get(batch), self.make))
            return batch

    monkeypatch.setattr(loop, "Prefetcher", Recording)
    run = [*TINY, "model.vocab_size=512", "train.eval_every=0", f"run.dir={tmp_path}"]
    train(config.load(None, [*run, "data.prefetch=3", "train.steps=3"]), Console(quiet=True))
    resumed = train(
        config.load(None, [*run, "data.prefetch=0", "train.steps=5"]), Console(quiet=True)
    )
    assert resumed.start_step == 3
    assert [(depth, step) for depth, step, *_ in seen] == [(3, 0), (3, 1), (3, 2), (0, 3), (0, 4)]
    for _, step, batch, make in seen:
        want = jax.device_get(make(step))
        assert batch.keys() == want.keys()
        for key in batch:
            np.testing.assert_array_equal(batch[key], want[key])

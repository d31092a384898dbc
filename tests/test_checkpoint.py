"""Checkpoints and fault tolerance, with real processes killed for real.

A run killed with SIGKILL (between steps or in the middle of writing a checkpoint) or
stopped with SIGTERM resumes from its last committed checkpoint to exactly the losses
and parameters of a run that never stopped. The killed runs compute in float16 with a
dynamic loss scale that starts too high and keeps overflowing (steps 1-3, 7, 10), so the
scale, its counters and the dropped updates must come back from the checkpoint exactly.
"""

import asyncio
import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers.cli import xla_env
from rich.console import Console
from tiny import TINY

from jaxtrain import config
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.errors import UserError
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program, make_train_step
from jaxtrain.train.loop import STEP_DELAY_ENV, TrainingDiverged, train

RUN = [
    *TINY,
    "model.vocab_size=512",
    "train.steps=12",
    "train.log_every=1",
    "train.eval_every=0",
    "checkpoint.every=3",
    "optim.warmup_steps=2",
]


# float16 compute; the scale (2**16 at first) overflows, halves, and doubles again after
# every 2 finite steps.
KILLED = [*RUN, "model.compute_dtype=float16", "train.loss_scale.period=2"]


def command(run_dir):
    args = [a for item in KILLED for a in ("--set", item)]
    exe = str(Path(sys.executable).parent / "jaxtrain")
    return [exe, "train", *args, "--set", f"run.dir={run_dir}"]


def env(delay=0.0):
    out = xla_env()
    if delay:
        out[STEP_DELAY_ENV] = str(delay)
    return out


def finish(run_dir):
    proc = subprocess.run(command(run_dir), capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(run_dir):
    """{step: (loss, loss scale, overflows so far)} as logged."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["loss_scale"], r["overflow_steps"]) for r in rows}


def final_params(run_dir):
    return ocp.StandardCheckpointer().restore(run_dir / "params")


def committed(run_dir):
    """Committed checkpoint steps, read without opening a manager (a manager would tidy
    the live writer's temporary directories). Orbax renames a step's directory to its
    bare number only once it is complete."""
    directory = run_dir / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def start_slow(run_dir, delay=0.3):
    return subprocess.Popen(
        command(run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(delay)
    )


def wait_for(predicate, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    finish(run_dir)
    return losses(run_dir), final_params(run_dir)


def assert_identical(run_dir, reference):
    ref_losses, ref_params = reference
    assert losses(run_dir) == ref_losses  # bit-exact, every step
    assert 0 < ref_losses[12][2] < 12  # the reference run overflowed, and trained
    jax.tree.map(np.testing.assert_array_equal, final_params(run_dir), ref_params)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = start_slow(run_dir)
    wait_for(lambda: 6 in committed(run_dir), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(committed(run_dir)) < 12
    finish(run_dir)
    assert_identical(run_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.03, 0.1])
def test_sigkill_while_writing_a_checkpoint(tmp_path, reference, delay):
    """The save of step 6 starts right before step 6 is logged; kill around then."""
    run_dir = tmp_path / "run"
    proc = start_slow(run_dir, delay=0.5)
    wait_for(lambda: logged_steps(run_dir) >= 6, proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = committed(run_dir)
    assert before and set(before) <= {3, 6}
    finish(run_dir)
    assert_identical(run_dir, reference)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = start_slow(run_dir)
    wait_for(lambda: logged_steps(run_dir) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    step = max(committed(run_dir))
    assert 4 <= step < 12 and f"stopped by SIGTERM at step {step}" in out
    resumed = finish(run_dir)
    assert f"resumed from {run_dir / 'checkpoints' / str(step)}" in resumed.stderr
    assert_identical(run_dir, reference)


def small_config(tmp_path, *extra):
    return config.load(None, [*RUN, f"run.dir={tmp_path}", *extra])


def test_restore_onto_other_meshes(tmp_path):
    """Saved on fsdp=8; restored on fsdp=4 x tensor=2 and on one device."""
    cfg = small_config(tmp_path)
    program = build_program(cfg, make_mesh(cfg))
    state = program.init_state()
    rng = np.random.default_rng(0)

    def batch(p):
        tokens = rng.integers(0, 512, size=(8, 17), dtype=np.int32)
        return jax.device_put(
            {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, p.batch_sharding
        )

    state, _ = program.train_step(state, batch(program))
    checkpointer = Checkpointer(tmp_path / "checkpoints", cfg.checkpoint)
    checkpointer.save(1, state, cfg)
    checkpointer.wait()
    next_batch = jax.device_get(batch(program))
    saved_params = jax.device_get(state.params)
    _, metrics = program.train_step(state, jax.device_put(next_batch, program.batch_sharding))
    expected_loss = float(metrics["loss"])

    layouts = {
        "fsdp4_tp2": (["mesh.preset=fsdp_tp", "mesh.fsdp=4", "mesh.tensor=2"], jax.devices()),
        "one_device": (["mesh.fsdp=1"], jax.devices()[:1]),
    }
    for overrides, devices in layouts.values():
        other_cfg = small_config(tmp_path, *overrides)
        other = build_program(other_cfg, make_mesh(other_cfg, devices))
        restored, meta = checkpointer.restore(1, other.abstract_state)
        assert meta["step"] == 1 and meta["config"]["train"]["steps"] == 12
        for leaf, sharding in zip(
            jax.tree.leaves(restored), jax.tree.leaves(other.state_shardings), strict=True
        ):
            assert leaf.sharding == sharding  # restored straight into the target layout
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), saved_params)
        _, metrics = other.train_step(restored, jax.device_put(next_batch, other.batch_sharding))
        np.testing.assert_allclose(float(metrics["loss"]), expected_loss, rtol=1e-6)
    checkpointer.close()


def corrupt(step_dir):
    """Truncate every array data file of a checkpoint."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        path.write_bytes(b"")


def snapshot(directory):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def test_corrupt_newest_falls_back_and_all_corrupt_refuses(tmp_path):
    cfg = small_config(tmp_path, "train.steps=6", "train.log_every=3")
    train(cfg, Console(quiet=True))
    assert committed(tmp_path) == [3, 6]
    corrupt(tmp_path / "checkpoints" / "6")
    buffer = Console(record=True, width=300)
    result = train(small_config(tmp_path, "train.steps=9", "train.log_every=3"), buffer)
    text = buffer.export_text()
    assert "checkpoints/6 is unreadable" in text and "trying an older one" in text
    assert result.start_step == 3 and result.end_step == 9
    assert committed(tmp_path) == [3, 6, 9]  # step 6 written anew
    assert list((tmp_path / "unreadable_checkpoints").iterdir())  # the bad one kept aside

    for step in committed(tmp_path):
        corrupt(tmp_path / "checkpoints" / str(step))
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="none of the checkpoints"):
        train(small_config(tmp_path, "train.steps=12"), Console(quiet=True))
    assert snapshot(tmp_path) == before  # nothing was touched


def test_divergence_stops_without_checkpointing_the_broken_state(tmp_path):
    cfg = small_config(
        tmp_path,
        "checkpoint.every=1",
        "optim.lr=1e10",
        "optim.grad_clip=0",
        "optim.warmup_steps=0",
    )
    with pytest.raises(TrainingDiverged, match=r"at step (\d+)") as err:
        train(cfg, Console(quiet=True))
    bad_step = int(err.value.args[0].split("at step ")[1].split(";")[0])
    assert bad_step >= 2  # the first steps were finite and were checkpointed...
    assert committed(tmp_path)[-1] == bad_step - 1  # ...and the broken one was not


def test_skip_mode_drops_nonfinite_updates_and_counts_them():
    """train.on_nonfinite=skip: a step with a NaN loss leaves parameters and optimizer
    state untouched and counts itself; the next finite step updates as usual."""
    cfg = config.load(None, [*RUN, "train.on_nonfinite=skip", "optim.warmup_steps=0"])
    program = build_program(cfg, make_mesh(cfg))
    step = jax.jit(
        make_train_step(program.spec, program.tx, program.lr_schedule, skip_nonfinite=True)
    )
    tokens = np.random.default_rng(0).integers(0, 128, (8, cfg.data.seq_len + 1))
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((8, cfg.data.seq_len), np.float32),
    }
    poisoned = dict(batch, weights=batch["weights"].copy())
    poisoned["weights"][3, 5] = np.nan
    before = jax.device_get(program.init_state())
    after, metrics = jax.device_get(step(before, poisoned))
    assert not np.isfinite(metrics["loss"]) and metrics["skipped_steps"] == 1
    assert (after.step, after.skipped) == (1, 1)
    jax.tree.map(
        np.testing.assert_array_equal,
        (after.params, after.opt_state),
        (before.params, before.opt_state),
    )
    later, metrics = jax.device_get(step(after, batch))
    assert np.isfinite(metrics["loss"]) and (later.step, later.skipped) == (2, 1)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), later.params, after.params)
    assert all(jax.tree.leaves(changed))


def test_keeps_the_newest_plus_every_nth(tmp_path):
    cfg = small_config(
        tmp_path, "checkpoint.every=2", "checkpoint.keep=2", "checkpoint.keep_every=4"
    )
    train(cfg, Console(quiet=True))
    assert committed(tmp_path) == [4, 8, 10, 12]


def test_resume_false_refuses_an_existing_run(tmp_path):
    train(small_config(tmp_path, "train.steps=3"), Console(quiet=True))
    with pytest.raises(UserError, match="run.dir"):
        train(small_config(tmp_path, "checkpoint.resume=false"), Console(quiet=True))


def test_close_waits_for_orbaxs_tidying_thread(tmp_path, monkeypatch):
    """A run that stops before its first save still closes cleanly: Orbax's tidying of
    old temporary directories runs on a thread that must be done before close returns,
    or it fails at interpreter shutdown after the CLI's one error line."""
    from orbax.checkpoint._src.path import temporary_paths

    done = []

    async def slow_cleanup(*args, **kwargs):
        await asyncio.sleep(0.5)
        done.append(True)

    monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_cleanup)
    Checkpointer(tmp_path / "checkpoints", small_config(tmp_path).checkpoint).close()
    assert done == [True]


class Trap:
    """Unpickling this creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_loading_never_unpickles(tmp_path):
    train(small_config(tmp_path, "train.steps=3"), Console(quiet=True))
    marker = tmp_path / "pwned"
    step_dir = tmp_path / "checkpoints" / "3"
    planted = ["evil.pkl", "state/evil.pkl", "state/checkpoint.pkl", "meta/metadata.pkl"]
    for target in (step_dir / name for name in planted):
        target.write_bytes(pickle.dumps(Trap(marker)))
    cfg = small_config(tmp_path)
    program = build_program(cfg, make_mesh(cfg))
    restored, meta = Checkpointer(tmp_path / "checkpoints", cfg.checkpoint).restore(
        3, program.abstract_state
    )
    assert meta["step"] == 3 and int(restored.step) == 3
    assert not marker.exists()


def test_eval_and_export_read_the_newest_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = train(
        small_config(run_dir, "train.steps=6", "train.eval_every=6"), Console(quiet=True)
    )
    exe = str(Path(sys.executable).parent / "jaxtrain")
    proc = subprocess.run(
        [exe, "eval", "--run", str(run_dir)], capture_output=True, text=True, env=env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"step 6: validation loss {result.eval_losses[6]:.4f}"
    out = tmp_path / "exported"
    proc = subprocess.run(
        [exe, "export", "--run", str(run_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    exported = ocp.StandardCheckpointer().restore(out)
    jax.tree.map(np.testing.assert_array_equal, exported, final_params(run_dir))
    proc = subprocess.run(
        [exe, "eval", "--run", str(tmp_path / "nope")], capture_output=True, text=True, env=env()
    )
    assert proc.returncode == 2 and proc.stderr.startswith("jaxtrain: error: --run:")


def test_async_saves_capture_their_step_despite_donation(tmp_path):
    """Each async save must hold its step's state even though the next step reuses the
    donated buffers at once: async and blocking runs write identical checkpoints."""
    runs = {}
    for mode in ("true", "false"):
        run_dir = tmp_path / mode
        cfg = small_config(
            run_dir,
            "train.steps=6",
            "checkpoint.every=1",
            "checkpoint.keep=6",
            f"checkpoint.async_save={mode}",
        )
        train(cfg, Console(quiet=True))
        program = build_program(cfg, make_mesh(cfg))
        checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
        runs[mode] = [
            jax.device_get(checkpointer.restore(step, program.abstract_state)[0])
            for step in range(1, 7)
        ]
        checkpointer.close()
    for a, b in zip(runs["true"], runs["false"], strict=True):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(runs["true"][0].params["embed"], runs["true"][5].params["embed"])

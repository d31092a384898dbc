"""Nothing a user types or a crash leaves behind loses a run.

A finished run (trained once per module) is copied into each test, which then does what
a user might: re-run it with a missing or broken ``checkpoints/``, a shorter
``train.steps``, another model shape, a torn ``metrics.jsonl``, or read it back with a
relative path. Each case either works or is refused with one line, and the run's files
are left exactly as they were.
"""

import errno
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import xla_env
from rich.console import Console
from tensorboardX.proto import event_pb2
from tiny import TINY

from jaxtrain import checkpoint, config
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.errors import UserError
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program
from jaxtrain.train.loop import train
from jaxtrain.train.rundir import read_metrics
from jaxtrain.train.runs import eval_run, export_run

RUN = [
    *TINY,
    "model.vocab_size=512",
    "train.steps=6",
    "train.log_every=2",
    "train.eval_every=3",
    "checkpoint.every=3",
    "optim.warmup_steps=2",
]
EXE = str(Path(sys.executable).parent / "jaxtrain")


def cfg_for(run_dir, *extra):
    return config.load(None, [*RUN, f"run.dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = train(cfg_for(run_dir), Console(quiet=True))
    return run_dir, result


@pytest.fixture
def run_copy(finished, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    shutil.copytree(finished[0], run_dir)
    return run_dir


def snapshot(directory):
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
        for p in sorted(directory.rglob("*"))
    }


def corrupt(step_dir):
    """Truncate every array data file of a checkpoint."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        path.write_bytes(b"")


def one_line_error(proc, *needles, after_start=False):
    """Exit 2 and one error line; a run that had started may have printed its model and
    compile lines before it, but nothing (no thread's traceback) may follow it."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    if after_start:
        start_up = ("model: ", "compiled train step in ")
        lines = [line for line in lines if not line.startswith(start_up)]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("jaxtrain: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def cli(*args, cwd=None):
    return subprocess.run(
        [EXE, *args], capture_output=True, text=True, env=xla_env(), cwd=cwd, timeout=300
    )


def test_eval_keeps_its_own_schedule(finished):
    """Logging every 2 steps and evaluating every 3: steps 3 and 6 are evaluated."""
    run_dir, result = finished
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert sorted(result.eval_losses) == [3, 6]


def test_readme_eval_with_a_relative_run_path_reads_and_writes_nothing(run_copy, finished):
    before = snapshot(run_copy)
    proc = cli("eval", "--run", "runs/tiny", cwd=run_copy.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"step 6: validation loss {finished[1].eval_losses[6]:.4f}"
    assert snapshot(run_copy) == before


def test_eval_and_export_fall_back_past_a_corrupt_checkpoint_without_moving_it(
    run_copy, monkeypatch
):
    corrupt(run_copy / "checkpoints" / "6")
    before = snapshot(run_copy)
    monkeypatch.chdir(run_copy.parents[1])
    buffer = Console(record=True, width=400)
    step, loss = eval_run("runs/tiny", [], buffer)
    assert step == 3 and loss > 0
    assert "checkpoints/6 is unreadable" in buffer.export_text()
    assert export_run("runs/tiny", "exported", [], Console(quiet=True)) == 3
    assert (run_copy.parents[1] / "exported").is_dir()
    assert snapshot(run_copy) == before  # read-only: nothing moved aside or tidied


@pytest.mark.parametrize("damage", ["removed", "a file"])
def test_rerun_without_checkpoints_is_refused_and_loses_nothing(run_copy, damage):
    shutil.rmtree(run_copy / "checkpoints")
    if damage == "a file":
        (run_copy / "checkpoints").write_text("not a directory")
    before = snapshot(run_copy)
    with pytest.raises(UserError, match="run.dir") as err:
        train(cfg_for(run_copy), Console(quiet=True))
    assert str(run_copy) in str(err.value)
    assert snapshot(run_copy) == before


def test_metrics_of_another_run_without_checkpoint_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 10, "loss": 2.0}\n')
    before = snapshot(run_dir)
    with pytest.raises(UserError, match="metrics.jsonl but no checkpoint"):
        train(cfg_for(run_dir), Console(quiet=True))
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_run_dir_that_is_or_is_under_a_file(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    run_dir = blocker if where == "is a file" else blocker / "run"
    with pytest.raises(UserError, match=r"^run.dir: .* a file, not a directory"):
        train(cfg_for(run_dir), Console(quiet=True))
    assert blocker.read_text() == "x"


def test_steps_below_the_newest_checkpoint_is_refused(run_copy):
    before = snapshot(run_copy)
    with pytest.raises(UserError, match=r"train.steps: 4 is below step 6"):
        train(cfg_for(run_copy, "train.steps=4"), Console(quiet=True))
    assert snapshot(run_copy) == before


def test_another_model_shape_is_a_mismatch_not_corruption(run_copy):
    before = snapshot(run_copy)
    with pytest.raises(UserError, match="holds a different state") as err:
        train(cfg_for(run_copy, "model.d_model=32"), Console(quiet=True))
    message = str(err.value)
    assert "--set model.d_model=64" in message and "\n" not in message
    assert "(64," in message or ", 64" in message  # names a differing shape
    assert snapshot(run_copy) == before  # nothing set aside as "unreadable"


def test_io_errors_are_retried_and_never_set_aside(run_copy, monkeypatch):
    cfg = cfg_for(run_copy)
    program = build_program(cfg, make_mesh(cfg))
    monkeypatch.setattr(checkpoint, "RETRY_DELAY_S", 0.0)
    real_restore = Checkpointer.restore
    failures = {"left": 2}

    def flaky(self, step, abstract_state):
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_restore(self, step, abstract_state)

    monkeypatch.setattr(Checkpointer, "restore", flaky)
    before = snapshot(run_copy)
    with Checkpointer(run_copy / "checkpoints", cfg.checkpoint) as ckpt:
        state, meta = ckpt.restore_latest(program.abstract_state, Console(quiet=True))
    assert meta["step"] == 6 and int(state.step) == 6  # two failures, then read

    failures["left"] = 10**6  # the storage stays broken
    with (
        Checkpointer(run_copy / "checkpoints", cfg.checkpoint) as ckpt,
        pytest.raises(UserError, match="I/O error") as err,
    ):
        ckpt.restore_latest(program.abstract_state, Console(quiet=True))
    assert "checkpoints/6" in str(err.value) and "left as it is" in str(err.value)
    assert snapshot(run_copy) == before


def tensorboard_scalars(tb_dir, tag="loss"):
    """{step: count} of ``tag`` as TensorBoard shows it: files in order, and a purge
    marker (SessionLog START at step p) hiding the earlier events at steps >= p."""
    seen: dict[int, int] = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == 1:
                seen = {s: n for s, n in seen.items() if s < event.step}
            for value in event.summary.value:
                if value.tag == tag:
                    seen[event.step] = seen.get(event.step, 0) + 1
    return seen


def test_resume_drops_a_torn_metrics_line_and_logs_each_step_once(run_copy):
    """A resumed run after a crash: the newest checkpoint is gone (steps 4-6 are redone)
    and metrics.jsonl ends in half a row. Every step is logged once, in both files."""
    shutil.rmtree(run_copy / "checkpoints" / "6")
    with (run_copy / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 3.1')
    buffer = Console(record=True, width=400)
    result = train(cfg_for(run_copy, "train.steps=8"), buffer)
    assert result.start_step == 3 and result.end_step == 8
    assert "dropped the torn last line" in buffer.export_text()
    steps = [r["step"] for r in read_metrics(run_copy / "metrics.jsonl")]
    assert steps == [2, 3, 4, 6, 8]
    assert tensorboard_scalars(run_copy / "tensorboard") == {s: 1 for s in steps}


def test_errors_on_paths_that_open_a_checkpointer_are_one_line(tmp_path):
    """Orbax's threads must not print after the one error line (the checkpointer is
    closed on every path)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(cfg_for(run_dir).to_yaml())
    one_line_error(cli("eval", "--run", str(run_dir)), "--run", "no checkpoint")
    missing = tmp_path / "nope"
    proc = cli(
        "train",
        *[a for s in RUN for a in ("--set", s)],
        "--set",
        f"run.dir={tmp_path / 'r2'}",
        "--set",
        f"model.init_from=hf:{missing}",
    )
    one_line_error(proc, str(missing), after_start=True)


@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_export_out_that_is_or_is_under_a_file(finished, tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker if where == "is a file" else blocker / "exported"
    with pytest.raises(UserError, match=r"^--out: .* a file, not a directory"):
        export_run(str(finished[0]), str(out), [], Console(quiet=True))
    assert blocker.read_text() == "x"


def test_a_step_beyond_the_device_memory_is_refused_before_allocating(tmp_path):
    """8 simulated devices share the host's RAM: a batch whose logits alone need
    hundreds of GiB is refused after compiling, before anything is allocated or written."""
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"^model: the compiled step needs .* GiB per device"):
        train(cfg_for(run_dir, f"train.global_batch={2**23}"), Console(quiet=True))
    assert not run_dir.exists()

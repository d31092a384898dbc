"""Multi-process runs: real processes joined by jax.distributed (gloo on 127.0.0.1), 4 CPU
devices each, started by `jaxtrain launch` (the README's command) or by explicit flags.

Two processes train like one process with 8 devices, whichever axis spans them (a
process may then hold separate runs of batch rows); checkpoints move between process
counts; a killed two-process run resumes bit-exact; SIGTERM to one rank stops both at
the same step; a crashed rank makes the launcher stop the other and fail fast.
"""

import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers.bounds import F32, LINEAR_ADAM, UPDATE, update_error
from helpers.cli import xla_env
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tiny import TINY

from jaxtrain import cli, config
from jaxtrain.data import process_rows
from jaxtrain.errors import UserError
from jaxtrain.launch import free_port
from jaxtrain.sharding import make_mesh
from jaxtrain.sharding.mesh import BATCH_AXES, MESH_AXES, _hybrid_grid
from jaxtrain.train import build_program
from jaxtrain.train.loop import STEP_DELAY_ENV

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
EXE = str(Path(sys.executable).parent / "jaxtrain")
RUN = [
    *TINY,
    "model.vocab_size=512",
    "train.steps=6",
    "train.log_every=1",
    "train.eval_every=0",
    "checkpoint.every=2",
    "optim.warmup_steps=1",
    *LINEAR_ADAM,  # so that the updates can be compared (helpers.bounds)
    "sample.max_new_tokens=0",  # sampled once, by the reference launch
]
LONG = ["train.steps=40"]  # for runs that are stopped from outside


def sets(run_dir, extra=()):
    return [a for item in [*RUN, *extra, f"run.dir={run_dir}"] for a in ("--set", item)]


def readme_launch():
    """The README's local two-process command, as an argv."""
    lines = (x.strip() for x in README.splitlines())
    line = next(x for x in lines if x.startswith("jaxtrain launch --nproc 2 "))
    return [EXE, *shlex.split(line)[1:]]


def env(devices=8, delay=0.0):
    out = xla_env(devices)
    if delay:
        out[STEP_DELAY_ENV] = str(delay)
    return out


def single(run_dir, extra=()):
    proc = subprocess.run(
        [EXE, "train", *sets(run_dir, extra)], capture_output=True, text=True, env=env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def start_launch(run_dir, extra=(), delay=0.0):
    """Start the README's launch command; its output goes to ``run_dir.log``."""
    log = Path(f"{run_dir}.log")
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*readme_launch(), *sets(run_dir, extra)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env(delay=delay),
        )
    return proc, log


def launch(run_dir, extra=()):
    proc, log = start_launch(run_dir, extra)
    code = proc.wait(timeout=300)
    return code, log.read_text()


def wait_for(pattern, log, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text(), re.MULTILINE):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {pattern!r}"
        time.sleep(0.1)


def pid(log, rank):
    return int(re.search(rf"^\[launch\] rank {rank}: pid (\d+)", log.read_text(), re.M)[1])


def alive(process_id):
    try:
        os.kill(process_id, 0)
    except ProcessLookupError:
        return False
    return True


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metric(run_dir, key, steps=None):
    return [r[key] for r in rows(run_dir) if steps is None or r["step"] in steps]


def final_params(run_dir, extra=()):
    cfg = config.load(None, [*RUN, *extra])
    target = build_program(cfg, make_mesh(cfg)).abstract_state.params
    return jax.device_get(ocp.StandardCheckpointer().restore(run_dir / "params", target))


def committed(run_dir):
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@functools.cache
def start_params():
    """The parameters every run here starts from (the same seed on any layout)."""
    cfg = config.load(None, RUN)
    return jax.device_get(build_program(cfg, make_mesh(cfg)).init_state().params)


def assert_close(a_dir, b_dir, steps=None):
    """The logged losses and norms at F32, the parameters' updates at UPDATE."""
    for key in ("loss", "grad_norm", "param_norm"):
        np.testing.assert_allclose(metric(a_dir, key, steps), metric(b_dir, key, steps), rtol=F32)
    updates = len(rows(b_dir))  # one per logged step
    errors = [
        update_error(end, reference_end, start, updates, UPDATE)
        for end, reference_end, start in zip(
            *(
                jax.tree.leaves(t)
                for t in (final_params(a_dir), final_params(b_dir), start_params())
            ),
            strict=True,
        )
    ]
    assert all(error <= allowed for error, allowed in errors), errors


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process x 8 devices and two processes x 4 devices, fsdp=8, uninterrupted."""
    root = tmp_path_factory.mktemp("reference")
    single(root / "single", ["mesh.fsdp=8"])
    code, output = launch(root / "multi", ["sample.max_new_tokens=12"])
    assert code == 0, output[-3000:]
    return root / "single", root / "multi", output


@pytest.mark.slow
def test_two_processes_match_one(reference):
    one, two, output = reference
    assert [r["step"] for r in rows(two)] == [1, 2, 3, 4, 5, 6]  # written once, by process 0
    assert_close(two, one)
    assert committed(two) == [2, 4, 6]
    assert re.search(r"^\[rank 0\] step 6 ", output, re.M)  # rank-prefixed output...
    assert not re.search(r"^\[rank 1\] step ", output, re.M)  # ...and only process 0 logs
    # Both processes generate the closing sample from the sharded parameters; one prints it.
    assert re.findall(r"^\[rank (\d)\] sample \(12 tokens, greedy\):", output, re.M) == ["0"]


def train_two_processes(run_dir, layout):
    """Train ``layout`` in two processes x 4 devices joined by explicit --coordinator flags."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [EXE, "train", *sets(run_dir, layout), "--coordinator", f"127.0.0.1:{port}"]
            + ["--num-processes", "2", "--process-id", str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(4),
        )
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_hybrid_mesh_puts_data_across_processes(tmp_path, reference):
    """data=2 across the processes (dcn_data=2) x fsdp=4 within each, joined by explicit
    --coordinator flags, trains like one process with 8 devices."""
    train_two_processes(tmp_path, ["mesh.data=2", "mesh.fsdp=4", "mesh.dcn_data=2"])
    assert_close(tmp_path, reference[0])


@pytest.mark.slow
def test_hybrid_mesh_splits_fsdp_across_processes_with_data_within(tmp_path, reference):
    """fsdp=4 half across the processes (dcn_fsdp=2) x data=2 within each: each process
    holds two separate runs of batch rows (0, 1, 4, 5 and 2, 3, 6, 7), builds just those,
    and the run trains like one process with 8 devices."""
    train_two_processes(tmp_path, ["mesh.data=2", "mesh.fsdp=4", "mesh.dcn_fsdp=2"])
    assert_close(tmp_path, reference[0])


@dataclasses.dataclass
class FakeDevice:
    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_hybrid_grid_keeps_within_host_axes_on_one_host():
    devices = [FakeDevice(i, i // 4) for i in range(8)]
    grid = _hybrid_grid((2, 4, 1, 1), (2, 1, 1, 1), devices)  # data across, fsdp within
    assert [{d.process_index for d in grid[i].flat} for i in range(2)] == [{0}, {1}]
    grid = _hybrid_grid((2, 4, 1, 1), (1, 2, 1, 1), devices)  # half of fsdp across
    assert [{d.process_index for d in grid[:, j].flat} for j in range(4)] == [{0}, {0}, {1}, {1}]
    # One process per device (JAX's SLURM default): a host is a run of consecutive ranks.
    devices = [FakeDevice(i, i) for i in range(8)]
    grid = _hybrid_grid((2, 4, 1, 1), (2, 1, 1, 1), devices)
    assert [sorted(d.process_index for d in grid[i].flat) for i in range(2)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
    ]
    with pytest.raises(UserError, match="^mesh.dcn_data: .* 3 host groups"):
        _hybrid_grid((3, 1, 1, 1), (3, 1, 1, 1), devices[:4])


class ProcessView:
    """A sharding seen from one fake process: only that process's devices are addressable."""

    def __init__(self, sharding, devices):
        self.sharding, self.devices = sharding, set(devices)

    def addressable_devices_indices_map(self, shape):
        indices = self.sharding.devices_indices_map(shape)
        return {d: index for d, index in indices.items() if d in self.devices}


def test_process_rows_of_fsdp_split_across_processes():
    """With dcn_fsdp=2 and data=2 no device order makes a process's batch rows contiguous
    (the batch is split over data, then fsdp): each process builds its separate rows."""
    fake = [FakeDevice(i, i // 4) for i in range(8)]
    grid = _hybrid_grid((2, 1, 4, 1, 1, 1), (1, 1, 2, 1, 1, 1), fake)
    real = jax.devices()[:8]
    mesh = Mesh(np.array([real[d.id] for d in grid.flat]).reshape(grid.shape), MESH_AXES)
    sharding = NamedSharding(mesh, P(BATCH_AXES, None))
    by_process = [[real[d.id] for d in fake if d.process_index == p] for p in range(2)]
    got = [process_rows(ProcessView(sharding, devices), (8, 16)) for devices in by_process]
    assert got == [(0, 1, 4, 5), (2, 3, 6, 7)]
    got = [process_rows(ProcessView(sharding, devices), (16, 16)) for devices in by_process]
    assert got == [(0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15)]
    # dcn_data=2: each process holds one half of the batch.
    grid = _hybrid_grid((2, 1, 4, 1, 1, 1), (2, 1, 1, 1, 1, 1), fake)
    mesh = Mesh(np.array([real[d.id] for d in grid.flat]).reshape(grid.shape), MESH_AXES)
    sharding = NamedSharding(mesh, P(BATCH_AXES, None))
    got = [process_rows(ProcessView(sharding, devices), (8, 16)) for devices in by_process]
    assert got == [range(0, 4), range(4, 8)]


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(tmp_path, reference):
    """Step 4 written by two processes finishes in one, and the other way round."""
    one, two, _ = reference
    to_one, to_two = tmp_path / "to_one", tmp_path / "to_two"
    shutil.copytree(two / "checkpoints" / "4", to_one / "checkpoints" / "4")
    shutil.copytree(one / "checkpoints" / "4", to_two / "checkpoints" / "4")
    one_output = single(to_one, ["mesh.fsdp=8"])
    code, two_output = launch(to_two)
    assert code == 0, two_output[-3000:]
    for target, output in ((to_one, one_output), (to_two, two_output)):
        assert "resumed from" in output
        assert [r["step"] for r in rows(target)] == [5, 6]
        assert_close(target, one, steps={5, 6})


@pytest.mark.slow
def test_killed_two_process_run_resumes_bit_exact(tmp_path, reference):
    """SIGKILL one rank: the launcher stops the other and fails fast; the relaunched run
    resumes from the last checkpoint to exactly the uninterrupted losses and parameters."""
    proc, log = start_launch(tmp_path, delay=0.3)
    wait_for(r"^\[rank 0\] step 4 ", log, proc)
    survivor = pid(log, 0)
    os.kill(pid(log, 1), signal.SIGKILL)
    start = time.monotonic()
    assert proc.wait(timeout=60) == 128 + signal.SIGKILL
    assert time.monotonic() - start < 30
    assert not alive(survivor)
    assert "[launch] rank 1 failed with exit status 137" in log.read_text()
    code, output = launch(tmp_path)
    assert code == 0, output[-3000:]
    assert "resumed from" in output
    multi = reference[1]
    for key in ("loss", "grad_norm", "param_norm"):
        assert metric(tmp_path, key) == metric(multi, key)
    jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path), final_params(multi))


@pytest.mark.slow
def test_two_processes_agree_on_falling_back_past_a_corrupt_checkpoint(tmp_path, reference):
    """The newest checkpoint is truncated: both processes find it unreadable, restore the
    same older step, and one of them (process 0) sets it aside, once."""
    multi = reference[1]
    run_dir = tmp_path / "run"
    shutil.copytree(multi, run_dir)
    files = [p for p in (run_dir / "checkpoints" / "6").rglob("*") if p.parent.name == "d"]
    assert files
    for path in files:
        path.write_bytes(b"")
    code, output = launch(run_dir)
    assert code == 0, output[-3000:]
    assert "checkpoints/6 is unreadable" in output and "resumed from" in output
    assert [p.name.split("-")[0] for p in (run_dir / "unreadable_checkpoints").iterdir()] == ["6"]
    assert committed(run_dir) == [2, 4, 6]
    for key in ("loss", "grad_norm", "param_norm"):
        assert metric(run_dir, key) == metric(multi, key)


def stops(text):
    """{rank: step} from the 'stopped by ... at step N' line each process prints."""
    found = re.findall(r"^\[rank (\d+)\] stopped by .* at step (\d+);", text, re.M)
    return {int(rank): int(step) for rank, step in found}


@pytest.mark.slow
def test_stop_signals_stop_every_rank_at_one_step(tmp_path):
    """SIGTERM to one rank, then (after resuming) SIGINT to the launcher: each time both
    ranks checkpoint the same step and exit 0."""
    proc, log = start_launch(tmp_path, LONG, delay=0.3)
    wait_for(r"^\[rank 0\] step 2 ", log, proc)
    os.kill(pid(log, 1), signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    first = stops(log.read_text())
    assert set(first) == {0, 1} and len(set(first.values())) == 1, first
    step = first[0]
    assert 2 <= step < 40 and committed(tmp_path)[-1] == step

    proc, log = start_launch(tmp_path, LONG, delay=0.3)
    wait_for(rf"^\[rank 0\] step {step + 2} ", log, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    second = stops(log.read_text())
    assert set(second) == {0, 1} and len(set(second.values())) == 1, second
    assert step < second[0] < 40 and committed(tmp_path)[-1] == second[0]


@pytest.mark.slow
def test_device_count_mismatch_is_explained_per_process(tmp_path):
    code, output = launch(tmp_path, ["mesh.fsdp=16"])
    assert code == 2
    assert "jaxtrain: error: mesh: " in output
    assert "there are 8 devices (2 processes x 4 local devices)" in output


def test_launch_refuses_bad_usage(capsys):
    assert cli.main(["launch", "--nproc", "2", "--", "eval", "--run", "x"]) == 2
    assert cli.main(["launch", "--nproc", "0", "--", "train"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("jaxtrain: error: ") for line in lines)


def test_readme_slurm_script_is_valid_bash(tmp_path):
    blocks = [textwrap.dedent(b) for b in re.findall(r"```bash\n(.*?)```", README, re.S)]
    script = next(block for block in blocks if "#SBATCH" in block)
    assert script.startswith("#!/bin/bash") and "srun jaxtrain train" in script
    path = tmp_path / "train.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_readme_slurm_script_requeues_itself_until_the_run_finishes(tmp_path):
    """A SIGTERM-stopped run exits 0, which --requeue never resubmits: the script must
    requeue itself while params/ (written at the end) is missing, and not after a crash."""
    blocks = [textwrap.dedent(b) for b in re.findall(r"```bash\n(.*?)```", README, re.S)]
    script = tmp_path / "train.sbatch"
    script.write_text(next(block for block in blocks if "#SBATCH" in block))
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    for name, body in {
        "srun": 'exit "${SRUN_STATUS:-0}"',
        "scontrol": f'echo "$@" >> {log}',
    }.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RUN_DIR=str(run_dir))
    env |= {"SLURM_JOB_ID": "42", "SLURM_NNODES": "1"}

    def submit(**extra):
        return subprocess.run(
            ["bash", str(script)], env=env | extra, capture_output=True
        ).returncode

    assert submit() == 0 and log.read_text() == "requeue 42\n"  # stopped early: again
    assert submit(SRUN_STATUS="1") == 1 and log.read_text() == "requeue 42\n"  # crashed: no
    (run_dir / "params").mkdir(parents=True)
    assert submit() == 0 and log.read_text() == "requeue 42\n"  # finished: done

"""``jaxtrain launch``: a failing process's cause reaches the launcher's stderr as one
line prefixed with its rank (its output stays on stdout, rank-prefixed), and bad
launcher usage is one line too."""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtrain import cli
from jaxtrain.launch import MAX_NPROC, _Output


def test_failing_rank_error_reaches_stderr(tmp_path):
    exe = shutil.which("jaxtrain", path=str(Path(sys.executable).parent)) or "jaxtrain"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    command = ["launch", "--nproc", "2", "--devices-per-proc", "4", "--", "train"]
    sets = ["--set", "mesh.fsdp=3", "--set", f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [exe, *command, *sets], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jaxtrain: error: [rank "), lines[0]
    rank = lines[0].split("[rank ")[1].split("]")[0]
    assert lines[0].startswith(f"jaxtrain: error: [rank {rank}] mesh: "), lines[0]
    assert "there are 8 devices (2 processes x 4 local devices)" in lines[0]
    # The rank-prefixed copy of every process's output stays on stdout.
    assert f"[rank {rank}] jaxtrain: error: mesh: " in proc.stdout
    assert f"[launch] rank {rank} failed with exit status 2" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def follow(output: _Output, rank: int, text: str) -> None:
    output.follow(rank, io.StringIO(text))


def test_cause_prefers_the_last_error_line():
    output = _Output(io.StringIO())
    follow(output, 0, "starting\njaxtrain: error: first\njaxtrain: error: mesh: bad\nbye\n")
    assert output.cause(0, 2) == "mesh: bad"
    assert "[rank 0] jaxtrain: error: mesh: bad" in output.stream.getvalue()


def test_cause_without_an_error_line():
    output = _Output(io.StringIO())
    follow(output, 1, "step 3  loss 2.0\n  \n")
    assert output.cause(1, 137) == "failed with exit status 137 (SIGKILL); its last line: " + (
        "step 3  loss 2.0"
    )
    follow(output, 2, "Traceback (most recent call last):\n  ...\nValueError: boom\n")
    assert output.cause(2, 1) == "failed with exit status 1; its last line: ValueError: boom"
    follow(output, 3, "")
    assert output.cause(3, 1) == "failed with exit status 1"


def test_cause_is_one_short_line():
    output = _Output(io.StringIO())
    follow(output, 0, "jaxtrain: error: " + "x" * 10_000 + "\n")
    assert len(output.cause(0, 2)) == 400


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--nproc", str(MAX_NPROC + 1), "--", "train"], f"--nproc: {MAX_NPROC + 1} must be in"),
        (["--nproc", "-3", "--", "train"], "--nproc: -3 must be in"),
        (["--nproc", "2", "--devices-per-proc", "0", "--", "train"], "--devices-per-proc: 0"),
        (["--nproc", "2", "--devices-per-proc", str(10**8), "--", "train"], "--devices-per-proc: "),
        (["--nproc", "2", "--", "plan"], "launch: give the command"),
    ],
)
def test_bad_launch_usage_is_one_line(args, expected, capsys):
    assert cli.main(["launch", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"jaxtrain: error: {expected}"), lines


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--nproc", "two", "--", "train"], "argument --nproc: invalid int value: 'two'"),
        (["--devices-per-proc", "4"], "the following arguments are required: --nproc"),
    ],
)
def test_argparse_usage_errors_are_one_line(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["launch", *args])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"jaxtrain: error: {expected} (see jaxtrain launch --help)"]

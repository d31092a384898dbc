"""Two real processes joined by jax.distributed (gloo on 127.0.0.1), 4 CPU devices each,
train exactly like one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny import TINY

from jaxtrain import config
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program

RUN = [
    *TINY,
    "model.vocab_size=512",
    "train.steps=4",
    "train.log_every=1",
    "train.eval_every=0",
    "checkpoint.every=2",
    "optim.warmup_steps=1",
]
EXE = str(Path(sys.executable).parent / "jaxtrain")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def argv(run_dir, layout):
    sets = [a for item in [*RUN, *layout, f"run.dir={run_dir}"] for a in ("--set", item)]
    return [EXE, "train", *sets]


def env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def run_two_processes(run_dir, layout):
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                *argv(run_dir, layout),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(rank),
            ],
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


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_params(run_dir, layout):
    cfg = config.load(None, [*RUN, *layout])
    target = build_program(cfg, make_mesh(cfg)).abstract_state.params
    return jax.device_get(ocp.StandardCheckpointer().restore(run_dir / "params", target))


@pytest.mark.parametrize(
    "layout", [["mesh.fsdp=8"], ["mesh.data=2", "mesh.fsdp=4"]], ids=["fsdp8", "data2_fsdp4"]
)
def test_two_processes_match_one(tmp_path, layout):
    single, multi = tmp_path / "single", tmp_path / "multi"
    proc = subprocess.run(
        argv(single, layout), capture_output=True, text=True, env=env(8), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_two_processes(multi, layout)
    one, two = rows(single), rows(multi)
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # written once, by process 0
    for key in ("loss", "grad_norm", "param_norm"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        final_params(multi, layout),
        final_params(single, layout),
    )
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "4",
    ]

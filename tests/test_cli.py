"""The ``jaxtrain`` command end to end, in subprocesses: a short training run writes its
files, and user mistakes end in one clear line on stderr and a non-zero exit."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.cli import SMALL, jaxtrain

from jaxtrain import config


def test_train_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = jaxtrain(
        "train",
        *SMALL,
        "--set",
        "train.steps=3",
        "--set",
        "train.log_every=1",
        "--set",
        "train.eval_every=3",
        "--set",
        f"run.dir={run_dir}",
        "--set",
        "sample.max_new_tokens=8",
        "--no-sample",
        "--set",
        "train.profile=2-3",
    )
    assert proc.returncode == 0, proc.stderr
    assert "sample (" not in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "step_time_s"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert 0 < rows[-1]["mfu"] < 1 and rows[-1]["tokens_per_sec"] > 0
    assert "eval_loss" in rows[-1]
    saved = config.from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert saved.train.steps == 3 and saved.model.d_model == 64 and saved.mesh.fsdp == -1
    assert "steps: 3" in proc.stdout  # the resolved config is printed
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "params").is_dir()
    assert str(run_dir / "metrics.jsonl") in proc.stdout
    # train.profile: a jax.profiler trace of steps 2-3, where TensorBoard looks for it
    assert list((run_dir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert f"profiled steps 2-3: {run_dir / 'profile'}" in proc.stderr


@pytest.mark.parametrize("command", [["plan", "--params"], ["train", "--dry-run"]])
def test_plan_prints_every_parameter(command, tmp_path):
    run_dir = tmp_path / "run"
    layout = [
        "--set",
        "mesh.preset=fsdp_tp",
        "--set",
        "mesh.tensor=2",
        "--set",
        f"run.dir={run_dir}",
    ]
    proc = jaxtrain(*command, *SMALL, *layout)
    assert proc.returncode == 0, proc.stderr
    for text in ("embed", "blocks/mlp/w_gate", "'fsdp', 'tensor'", "per device", "optimizer"):
        assert text in proc.stdout, text
    assert not run_dir.exists()  # planning trains nothing and writes nothing


def test_prepare_then_train(tmp_path):
    (tmp_path / "a.txt").write_text("def hello():\n    return 'world'\n" * 200)
    docs = [json.dumps({"text": f"document number {i} " * 30}) for i in range(20)]
    (tmp_path / "b.jsonl").write_text("\n".join(docs))
    out = tmp_path / "tokens"
    proc = jaxtrain(
        "prepare",
        "--input",
        str(tmp_path / "a.txt"),
        str(tmp_path / "b.jsonl"),
        "--output",
        str(out),
        "--val-fraction",
        "0.2",
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "meta.json").is_file() and (out / "train.npy").is_file()
    proc = jaxtrain(
        "train",
        *SMALL,
        "--set",
        "train.steps=2",
        "--set",
        f"data.path={out}",
        "--set",
        "data.seq_len=16",
        "--set",
        f"run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """The README's first command: `jaxtrain train`, as a user runs it (one CPU device, no
    XLA flags), finishes, learns and says where its outputs are. It runs the default
    config at 40 of its 100 steps, evaluated every 10: the shortest run whose validation
    loss clearly falls (3.64 -> 2.30 on the built-in corpus), at a third of the time."""
    exe = shutil.which("jaxtrain", path=str(Path(sys.executable).parent)) or "jaxtrain"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    short = ["--set", "train.steps=40", "--set", "train.eval_every=10"]
    proc = subprocess.run(
        [exe, "train", *short], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "runs" / "tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 4 and evals[-1] < evals[0] - 0.3 and evals[-1] < 2.5, evals
    for name in ("metrics.jsonl", "tensorboard", "params"):
        assert str(run_dir / name) in proc.stdout, name
    assert "sample (64 tokens, greedy):" in proc.stdout  # and the model's text after it


BAD_INPUTS = {
    "unknown key": (["--set", "model.n_layerz=2"], "model.n_layerz"),
    "wrong type": (["--set", "train.steps=many"], "train.steps"),
    "mesh product": (["--set", "mesh.fsdp=3"], "mesh"),
    "heads vs tensor": (
        ["--set", "mesh.preset=fsdp_tp", "--set", "mesh.tensor=8", "--set", "mesh.fsdp=1"],
        "model.n_heads",
    ),
    "batch vs data axes": (["--set", "train.global_batch=12"], "train.global_batch"),
    "seq over max positions": (["--set", "data.seq_len=2048"], "data.seq_len"),
    "missing data path": (["--set", "data.path=/nonexistent/tokens"], "data.path"),
    "unknown model": (["--set", "model.family=gpt9"], "model.family"),
    "missing config file": (["/nonexistent/config.yaml"], "config file"),
    "bad override syntax": (["--set", "train.steps"], "--set train.steps"),
    "missing tokenizer": (
        ["--set", "data.tokenizer=/nonexistent/tokenizer.json"],
        "data.tokenizer",
    ),
    "vocab too small": (["--set", "model.vocab_size=128"], "model.vocab_size"),
    "partial multi-process settings": (["--coordinator", "127.0.0.1:1"], "--coordinator"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_line(case, tmp_path):
    args, key = BAD_INPUTS[case]
    proc = jaxtrain("train", *args, "--set", f"run.dir={tmp_path / 'run'}", timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jaxtrain: error: ") and key in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr

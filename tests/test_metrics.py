"""FLOPs accounting, peak lookup, and the metric writers."""

import io
import json
import subprocess
import sys
import types

import pytest
from rich.console import Console

from jaxtrain import config
from jaxtrain.metrics import (
    PEAK_FLOPS,
    MetricsWriter,
    ProgressDisplay,
    flops_per_token,
    peak_flops,
)


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = config.load(None).model  # d 256, 4 layers, mlp 704, vocab 512, untied
    d, f, layers, vocab = 256, 704, 4, 512
    kv = 2 * 64
    block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # q, o, k, v, mlp, two norms
    total = vocab * d * 2 + layers * block + d
    attention = 12 * layers * d * 128
    assert flops_per_token(cfg, total, 128) == 6 * (total - vocab * d) + attention


def fake(kind, platform="gpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


def test_peak_flops_table():
    assert peak_flops([fake("NVIDIA H100 80GB HBM3")] * 8) == 8 * PEAK_FLOPS["H100"]
    assert peak_flops([fake("TPU v5 lite", "tpu")] * 4) == 4 * PEAK_FLOPS["TPU v5 lite"]
    assert peak_flops([fake("TPU v5p", "tpu")]) == PEAK_FLOPS["TPU v5p"]
    assert peak_flops([fake("Some Future GPU")]) is None


def test_cpu_peak_is_measured():
    peak = peak_flops([fake("cpu", "cpu")])
    assert 1e9 < peak < 1e14


def test_writer_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(1, {"loss": 2.5, "mfu": None})
    writer.write(2, {"loss": 2.0, "mfu": 0.3})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5, "mfu": None}, {"step": 2, "loss": 2.0, "mfu": 0.3}]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_shows_loss_throughput_and_mfu(terminal):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=120)
    progress = ProgressDisplay(console, total=10)
    progress.update(5, {"loss": 1.2345, "tokens_per_sec": 4321.0, "mfu": 0.25, "lr": 1e-3})
    progress.close()
    text = buffer.getvalue()
    assert "1.2345" in text and "4,321 tok/s" in text and "MFU 25.0%" in text


def test_the_writer_starts_without_importing_torch(tmp_path):
    """tensorboardX imports torch when it is installed; the writer keeps it out (a second
    of every run's start), writes its event file, and torch still imports afterwards."""
    code = f"""
import sys
from pathlib import Path
from jaxtrain.metrics import MetricsWriter
writer = MetricsWriter(Path({str(tmp_path)!r}))
writer.write(1, {{"loss": 2.0}})
writer.close()
assert "torch" not in sys.modules, "torch was imported"
import torch
print(torch.zeros(1).shape)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

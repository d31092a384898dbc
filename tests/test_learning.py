"""On the built-in corpus, the tiny model's validation loss falls clearly in 100 steps."""

import math

import pytest

from jaxtrain import config
from jaxtrain.train.loop import train


@pytest.mark.slow
def test_validation_loss_falls(tmp_path):
    cfg = config.load(
        None,
        [
            "model.n_layers=2",
            "model.d_model=64",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.mlp_dim=192",
            "data.seq_len=64",
            "train.global_batch=16",
            "train.steps=100",
            "train.log_every=10",
            "train.eval_every=10",
            "optim.warmup_steps=10",
            "optim.lr=1e-2",
            f"run.dir={tmp_path}",
        ],
    )
    result = train(cfg)
    evals = result.eval_losses
    assert sorted(evals) == list(range(10, 101, 10))
    # Uniform guessing over 512 ids costs ln(512) = 6.2 nats; bytes of Python source are
    # far more predictable than that once the model has learned anything.
    assert evals[10] < math.log(512)
    assert evals[100] < evals[10] - 0.8
    assert evals[100] < 2.7

"""The decode benchmark (``benchmarks/decode.py``) runs end to end at a tiny shape: the
weights reach transformers through jaxtrain's exporter, both sides make the same greedy
tokens, and the JSON report holds both sides' rates."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "decode.py"
TINY = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.mlp_dim=128",
    "model.vocab_size=256",
    "model.max_seq_len=32",
    "data.seq_len=32",
]


def test_decode_benchmark_runs_at_a_tiny_shape(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("decode_benchmark", SCRIPT)
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    out = tmp_path / "decode.json"
    argv = ["--set", *TINY, "--batches", "2", "--prompt-len", "8", "--new-tokens", "5"]
    assert decode.main([*argv, "--reps", "1", "--json", str(out)]) == 0

    (result,) = json.loads(out.read_text())["results"]
    assert result["batch"] == 2
    assert result["agreement"]["equal_fraction"] == 1.0
    for side in ("jaxtrain", "hf"):
        assert result[side]["tokens_per_s"] > 0
        assert len(result[side]["one_token_times_s"]) == 1
    assert "vs HF" in capsys.readouterr().out

"""`jaxtrain generate` and the Python API on a trained run: the CLI streams what the API
returns, the streamed pieces add up to the returned text, and bad input gets one line."""

import shutil
from pathlib import Path

import pytest
from helpers.cli import SMALL, jaxtrain
from rich.console import Console

from jaxtrain.generate.api import Generator
from jaxtrain.generate.beam import BeamConfig
from jaxtrain.generate.sampling import SamplingConfig

PROMPT = "def main("
FIXTURES = Path(__file__).parent / "fixtures" / "hf"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("gen") / "run"
    sets = ["train.steps=3", "train.eval_every=0", f"run.dir={run}"]
    sets += [f"sample.prompt={PROMPT}", "sample.max_new_tokens=12"]  # the sample after training
    proc = jaxtrain("train", *SMALL, *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run.parent / "train.out").write_text(proc.stdout)
    return run


def test_cli_streams_what_the_api_returns(run_dir):
    proc = jaxtrain("generate", "--run", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    generator = Generator.from_run(str(run_dir), console=Console(quiet=True))
    pieces = []
    (text,) = generator(
        [PROMPT], max_new_tokens=12, on_text=lambda row, piece: pieces.append((row, piece))
    )
    assert proc.stdout == PROMPT + text + "\n"
    assert "".join(p for _, p in pieces) == text and {r for r, _ in pieces} <= {0}
    # `jaxtrain train` ended by printing the same sample from the parameters it trained.
    printed = (run_dir.parent / "train.out").read_text()
    assert f"sample (12 tokens, greedy):\n{PROMPT}{text}\n" in printed
    # A batch of prompts of different lengths: each row as if generated alone (greedy).
    texts = generator([PROMPT, "x", PROMPT], max_new_tokens=12)
    assert texts[0] == texts[2] == text
    assert texts[1] == generator(["x"], max_new_tokens=12)[0]
    # Stop strings cut the text; sampling with a seed is reproducible.
    if text:
        stop = text[len(text) // 2]
        cut = generator([PROMPT], max_new_tokens=12, stop=[stop])[0]
        assert cut == text[: text.find(stop)]
    hot = SamplingConfig(temperature=1.2)
    assert generator([PROMPT], sampling=hot, seed=3) == generator([PROMPT], sampling=hot, seed=3)


def test_cli_beam_search_prints_what_the_api_returns(run_dir):
    args = ["--prompt", PROMPT, "--max-new-tokens", "8", "--num-beams", "3"]
    proc = jaxtrain("generate", "--run", str(run_dir), *args, "--length-penalty", "0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    generator = Generator.from_run(str(run_dir), console=Console(quiet=True))
    beams = BeamConfig(num_beams=3, length_penalty=0.5)
    pieces = []
    (text,) = generator(
        [PROMPT], max_new_tokens=8, beams=beams, on_text=lambda _, piece: pieces.append(piece)
    )
    assert proc.stdout == PROMPT + text + "\n" and "".join(pieces) == text


@pytest.mark.parametrize(
    "args, key",
    [
        (["--prompt", "x"], "--run"),  # neither --run nor --hf: argparse
        (["--run", "/nonexistent/run", "--prompt", "x"], "--run"),
        (["--run", "RUN"], "--prompt"),
        (["--run", "RUN", "--prompt", "x", "--temperature", "-1"], "generate.temperature"),
        (["--run", "RUN", "--prompt", "x", "--top-p", "2"], "generate.top_p"),
        (["--run", "RUN", "--prompt", "x", "--num-beams", "0"], "--num-beams"),
        (["--run", "RUN", "--prompt", "x", "--num-beams", "2", "--top-k", "5"], "--num-beams"),
        (["--run", "RUN", "--prompt-file", "/nonexistent/prompts.txt"], "--prompt-file"),
        (["--hf", "HF", "--prompt", "x"], "--hf"),
        # GPT-2's 32 learned positions (the fixture's n_positions) cannot hold 40 + 8 tokens
        (["--hf", "GPT2", "--prompt", " ".join(map(str, range(40)))], "model.max_seq_len"),
    ],
)
def test_bad_input_gets_one_line(args, key, run_dir, tmp_path):
    hf = tmp_path / "hf"  # a model directory without tokenizer.json
    shutil.copytree(FIXTURES / "llama", hf)
    paths = {"RUN": run_dir, "HF": hf, "GPT2": FIXTURES / "gpt2"}
    args = [str(paths.get(a, a)) for a in args]
    proc = jaxtrain("generate", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 2 and key in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr

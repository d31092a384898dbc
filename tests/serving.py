"""Helpers of the `jaxtrain serve` tests: a model directory with a character tokenizer and a
chat template, and a real server process on 127.0.0.1."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
from helpers.cli import xla_env

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role') }}{% endif %}"
    "<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>"
    "{% endif %}"
)


def char_tokenizer(directory: Path) -> None:
    """A tokenizer.json of one token per printable ASCII character (96 ids with
    <|endoftext|> and [UNK]: the LLaMA fixture's vocabulary)."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel

    chars = [chr(c) for c in range(32, 126)]
    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {c: i + 2 for i, c in enumerate(chars)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(directory / "tokenizer.json"))


def chat_model(directory: Path) -> Path:
    """The LLaMA fixture with the character tokenizer and a chat template."""
    shutil.copytree(FIXTURES / "llama", directory)
    char_tokenizer(directory)
    config = {"chat_template": CHAT_TEMPLATE, "eos_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


class Server:
    """``jaxtrain serve ARGS --port 0`` in a subprocess; ``url`` once it listens."""

    def __init__(self, *args: str, log: Path):
        exe = shutil.which("jaxtrain", path=str(Path(sys.executable).parent)) or "jaxtrain"
        # JAX_LOG_COMPILES: every compilation is a line of the log (compiles_after_ready).
        env = xla_env(JAX_LOG_COMPILES="1")
        self.log = log
        self.proc = subprocess.Popen(
            [exe, "serve", *args, "--port", "0"], stdout=subprocess.PIPE,
            stderr=log.open("w"), text=True, env=env,
        )  # fmt: skip
        line = self.proc.stdout.readline()
        found = re.search(r"on (http://\S+)", line)
        assert found, f"no address in {line!r}; log: {self.log.read_text()[-2000:]}"
        self.url = found.group(1)
        self.health_before_ready: list[int] = []

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Poll /health until 200, keeping the statuses seen before."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                status = httpx.get(self.url + "/health", timeout=5).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                self.ready_at = len(self.log.read_text())
                return
            if status is not None:
                self.health_before_ready.append(status)
            time.sleep(0.05)
        raise AssertionError(f"not ready in {timeout} s: {self.log.read_text()[-2000:]}")

    def compiles_after_ready(self) -> list[str]:
        """The log's compilation lines since /health turned 200."""
        lines = self.log.read_text()[self.ready_at :].splitlines()
        return [line for line in lines if "Compiling" in line]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def sse_events(lines) -> list:
    """The JSON payloads of a server-sent event stream up to ``data: [DONE]`` (which must
    end it)."""
    events = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            return events
        events.append(json.loads(data))
    raise AssertionError("the stream ended without data: [DONE]")

"""Load on ``jaxtrain serve``: the same streamed completions at several concurrencies.

The benchmark shape is ``configs/bench-cpu.yaml`` (LLaMA, 8 layers, d_model 512, vocab
32000, float32). A random-init jaxtrain model is written as an HF directory with
jaxtrain's exporter (``save_pretrained``, as ``benchmarks/decode.py`` does), next to a
word-level ``tokenizer.json`` over the whole vocabulary (id 0 ``<|endoftext|>``, the EOS;
id i the word ``t{i}``; decoding joins words with spaces, so every token is visible text).
``jaxtrain serve --hf DIR`` then runs in a subprocess on 127.0.0.1 and this process is its
only client.

After one untimed warm-up request, for each concurrency C the same ``--requests``
completions (seeded random prompts of ``--prompt-len`` words, ``--new-tokens`` each,
temperature 0, ``stream: true`` with ``stream_options.include_usage``) are sent with at
most C in flight (asyncio + httpx). Per concurrency:

- tokens/s: the completion tokens of every request (from each stream's usage chunk) /
  the wall time from the first request sent to the last stream ended;
- vs C=1: that rate over the rate of the same requests answered one at a time;
- TTFT: request sent -> first SSE chunk with text, p50 and p99 over the requests;
- ITL: the gaps between a request's successive text chunks, p50 and p99 over all gaps
  (the server sends one chunk per token unless a token's text is held back, which the
  table's tokens / chunks check shows);
- server ITL: the mean of the server's own ``jaxtrain_inter_token_latency_seconds`` over
  the level (from ``GET /metrics`` before and after), which leaves out the HTTP path.

The server is stopped with SIGTERM and must exit 0. Everything is bounded: requests go
only to the server's 127.0.0.1 address, 1 + ``--requests`` x (number of concurrencies)
completions are sent in all, and the whole run stops after ``--timeout`` seconds.

    python benchmarks/serve_load.py --concurrency 1,8,32 --requests 32 --prompt-len 128 \\
        --new-tokens 64 --max-batch 32
    python benchmarks/serve_load.py --set model.n_layers=2 --requests 8 --concurrency 1,4 \\
        --prompt-len 16 --new-tokens 8
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BENCH_CONFIG = str(HERE.parent / "configs" / "bench-cpu.yaml")
HOST = "127.0.0.1"
NAME = "bench"
EOS = "<|endoftext|>"
INSTALL_HINT = "pip install -e '.[serve]' httpx"


def write_model(config: str, overrides: list[str], directory: Path) -> tuple:
    """(config, parameter count) of a random-init model written as an HF directory with a
    tokenizer.json."""
    from flax import nnx

    from jaxtrain import models
    from jaxtrain.config import load
    from jaxtrain.metrics import count_params

    cfg = load(config, overrides)
    model = models.build(cfg.model, rngs=nnx.Rngs(0))
    models.save_pretrained(cfg.model, model, directory)
    write_tokenizer(directory, cfg.model.vocab_size)
    return cfg, count_params(nnx.state(model, nnx.Param))


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json: id 0 is EOS, id i the word ``t{i}``; no decoder, so
    decoded ids are their words joined by spaces."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {EOS: 0} | {f"t{i}": i for i in range(1, vocab_size)}
    tokenizer = Tokenizer(WordLevel(vocab))  # an unknown word is an error, not a token
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([EOS])
    tokenizer.save(str(directory / "tokenizer.json"))


def make_prompts(n: int, length: int, vocab_size: int, seed: int = 0) -> list[str]:
    """``n`` prompts of ``length`` random words (never EOS), each ``length`` tokens."""
    ids = np.random.default_rng(seed).integers(1, vocab_size, size=(n, length))
    return [" ".join(f"t{i}" for i in row) for row in ids]


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("--timeout: the run took longer")
    return left


class Server:
    """``jaxtrain serve --hf DIR --host 127.0.0.1 --port 0`` in a subprocess."""

    def __init__(self, directory: Path, args: argparse.Namespace, max_len: int, log: Path):
        exe = shutil.which("jaxtrain", path=str(Path(sys.executable).parent))
        command = [exe] if exe else [sys.executable, "-m", "jaxtrain.cli"]
        command += [
            "serve", "--hf", str(directory), "--host", HOST, "--port", "0", "--name", NAME,
            "--max-batch", str(args.max_batch), "--max-len", str(max_len),
            "--prefill-chunk", str(args.prefill_chunk),
            "--max-queue", str(max(int(c) for c in args.concurrency.split(","))),
        ]  # fmt: skip
        env = dict(os.environ)
        env.setdefault("JAX_PLATFORMS", "cpu")
        self.log = log
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env
        )
        self.url = ""

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:]

    def wait_ready(self, deadline: float) -> tuple[float, float]:
        """Wait for the address line, then for ``/health`` 200; returns (seconds to
        listening, seconds from listening to ready)."""
        import httpx

        readable, _, _ = select.select([self.proc.stdout], [], [], remaining(deadline))
        line = self.proc.stdout.readline() if readable else ""
        prefix = f"http://{HOST}:"
        if f"on {prefix}" not in line:
            raise RuntimeError(f"no address in {line!r}; log:\n{self.log_tail()}")
        self.url = line.split(" on ", 1)[1].split()[0]
        listening = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            try:
                status = httpx.get(self.url + "/health", timeout=5, trust_env=False).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                return listening - self.started, time.monotonic() - listening
            time.sleep(min(0.1, remaining(deadline)))

    def stop(self) -> int | None:
        """SIGTERM, then the exit status (None: it had to be killed after 60 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


async def complete(client, prompt: str, new_tokens: int) -> dict:
    """One streamed completion: when its text chunks arrived and how many tokens it made."""
    body = {
        "model": NAME, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    arrivals, usage, finish = [], None, None
    sent = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            error = (await response.aread()).decode(errors="replace")[:300]
            raise RuntimeError(f"HTTP {response.status_code}: {error}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise RuntimeError(f"the stream failed: {event['error']}")
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                if choice["text"]:
                    arrivals.append(time.perf_counter())
                finish = choice["finish_reason"] or finish
    if usage is None or not arrivals:
        raise RuntimeError(f"a stream without {'text' if usage else 'a usage chunk'}")
    return {
        "ttft_s": arrivals[0] - sent,
        "gaps_s": np.diff(arrivals).tolist(),
        "chunks": len(arrivals),
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "finish_reason": finish,
    }


async def run_level(url: str, prompts: list[str], concurrency: int, new_tokens: int,
                    timeout: float) -> tuple[list[dict], float]:  # fmt: skip
    """Every prompt, at most ``concurrency`` in flight; (per-request records, wall s)."""
    import httpx

    limit = asyncio.Semaphore(concurrency)
    pool = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, timeout=timeout, limits=pool, trust_env=False
    ) as client:

        async def one(prompt: str) -> dict:
            async with limit:
                return await complete(client, prompt, new_tokens)

        start = time.perf_counter()
        records = await asyncio.gather(*(one(p) for p in prompts))
        return records, time.perf_counter() - start


def scrape(url: str) -> dict[str, float]:
    """The server's unlabelled metric samples (counters, gauges, histogram sums/counts)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels and not s.name.endswith("_created")
    }


def summarize(records: list[dict], wall: float, concurrency: int, before: dict,
              after: dict) -> dict:  # fmt: skip
    """One concurrency's figures from its requests and the server's metrics around it."""

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    ttft = [r["ttft_s"] for r in records]
    gaps = [g for r in records for g in r["gaps_s"]]
    tokens = sum(r["completion_tokens"] for r in records)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    itl_count = delta("jaxtrain_inter_token_latency_seconds_count")
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "wall_s": wall,
        "completion_tokens": tokens,
        "text_chunks": sum(r["chunks"] for r in records),
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_s": pct(gaps, 50),
        "itl_p99_s": pct(gaps, 99),
        "server_itl_mean_s": (
            delta("jaxtrain_inter_token_latency_seconds_sum") / itl_count if itl_count else None
        ),
        "server_generated_tokens": delta("jaxtrain_generated_tokens_total"),
        "finish_reasons": dict(collections.Counter(r["finish_reason"] for r in records)),
        "prompt_tokens": sorted({r["prompt_tokens"] for r in records}),
        "per_request": records,
    }


def table(levels: list[dict]) -> str:
    """The markdown table: one row per concurrency, rates relative to concurrency 1."""

    def ms(x: float | None) -> str:
        return "–" if x is None else f"{1000 * x:.1f}"

    base = next((lv["tokens_per_s"] for lv in levels if lv["concurrency"] == 1), None)
    lines = [
        "| concurrency | requests | wall s | tokens | tokens / chunks | tokens/s | vs C=1 "
        "| TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | server ITL mean ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        ratio = f"{lv['tokens_per_s'] / base:.2f}" if base else "–"
        lines.append(
            f"| {lv['concurrency']} | {lv['requests']} | {lv['wall_s']:.2f} "
            f"| {lv['completion_tokens']} | {lv['completion_tokens'] / lv['text_chunks']:.2f} "
            f"| {lv['tokens_per_s']:.1f} | {ratio} | {ms(lv['ttft_p50_s'])} "
            f"| {ms(lv['ttft_p99_s'])} | {ms(lv['itl_p50_s'])} | {ms(lv['itl_p99_s'])} "
            f"| {ms(lv['server_itl_mean_s'])} |"
        )
    return "\n".join(lines)


def check(levels: list[dict], args: argparse.Namespace) -> list[str]:
    """What would make the figures mean something else than they say."""
    problems = []
    for lv in levels:
        c = lv["concurrency"]
        if lv["prompt_tokens"] != [args.prompt_len]:
            problems.append(f"C={c}: prompts encoded to {lv['prompt_tokens']} tokens")
        if lv["server_generated_tokens"] != lv["completion_tokens"]:
            problems.append(
                f"C={c}: the server counted {lv['server_generated_tokens']:.0f} generated "
                f"tokens, the streams' usage {lv['completion_tokens']}"
            )
        if lv["finish_reasons"] != {"length": lv["requests"]}:
            problems.append(f"C={c}: finish reasons {lv['finish_reasons']} (EOS drawn?)")
    return problems


def run(args: argparse.Namespace, levels_c: list[int], deadline: float, tmp: Path) -> dict:
    """Write the model, start the server, run every level, stop the server."""
    cfg, n_params = write_model(args.config, args.set, tmp / "model")
    print(f"model: {n_params / 1e6:.1f}M parameters in {tmp / 'model'}", file=sys.stderr)
    prompts = make_prompts(args.requests, args.prompt_len, cfg.model.vocab_size, args.seed)
    max_len = -(-(args.prompt_len + args.new_tokens) // 16) * 16
    server = Server(tmp / "model", args, max_len, tmp / "serve.log")
    try:
        start_s, compile_s = server.wait_ready(deadline)
        print(f"server: listening after {start_s:.1f}s, ready {compile_s:.1f}s later",
              file=sys.stderr)  # fmt: skip
        left = remaining(deadline)
        warm = asyncio.run(
            asyncio.wait_for(run_level(server.url, prompts[:1], 1, args.new_tokens, left), left)
        )
        print(f"warm-up request: {warm[1]:.2f}s", file=sys.stderr)
        levels = []
        for c in levels_c:
            before = scrape(server.url)
            left = remaining(deadline)
            level = run_level(server.url, prompts, c, args.new_tokens, left)
            records, wall = asyncio.run(asyncio.wait_for(level, left))
            levels.append(summarize(records, wall, c, before, scrape(server.url)))
            print(f"concurrency {c}: {wall:.2f}s, {levels[-1]['tokens_per_s']:.1f} tokens/s",
                  file=sys.stderr)  # fmt: skip
    except BaseException:
        state = "running" if server.proc.poll() is None else f"exited {server.proc.returncode}"
        print(f"server ({state}) log, tail:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        exit_code = server.stop()
    return {
        "config": args.config, "overrides": args.set, "n_params": n_params,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "requests": args.requests, "max_batch": args.max_batch, "max_len": max_len,
        "prefill_chunk": args.prefill_chunk, "start_s": start_s, "compile_s": compile_s,
        "warmup_s": warm[1], "exit_code": exit_code, "levels": levels,
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=BENCH_CONFIG)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides")
    parser.add_argument("--concurrency", default="1,8,32", help="requests in flight: 1,8,32")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency")
    parser.add_argument("--prompt-len", type=int, default=128, help="words (= tokens)")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's decode rows")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="the server's")
    parser.add_argument("--seed", type=int, default=0, help="of the prompts")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the run")
    parser.add_argument("--json", metavar="OUT", help="also write every request's figures")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels_c = [int(c) for c in args.concurrency.split(",")]
    if min(levels_c) < 1 or args.requests < 1 or args.new_tokens < 1 or args.prompt_len < 1:
        raise SystemExit("--concurrency, --requests, --new-tokens, --prompt-len: positive")
    try:
        import httpx  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"serve_load.py needs {err.name}: {INSTALL_HINT}") from None
    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args, levels_c, deadline, Path(tmp))
    report |= {"cpu_count": os.cpu_count(), "machine": platform.platform()}

    print(
        f"{report['n_params'] / 1e6:.1f}M parameters; {args.requests} requests per level, "
        f"prompt {args.prompt_len} tokens, {args.new_tokens} new, temperature 0; server "
        f"--max-batch {args.max_batch} --max-len {report['max_len']} --prefill-chunk "
        f"{args.prefill_chunk}; listening after {report['start_s']:.1f} s, compiled "
        f"{report['compile_s']:.1f} s later; warm-up request {report['warmup_s']:.2f} s\n"
    )
    print(table(report["levels"]))
    problems = check(report["levels"], args)
    if report["exit_code"] != 0:
        problems.append(f"the server exited {report['exit_code']} after SIGTERM, not 0")
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    brief = {k: v for k, v in report.items() if k != "levels"}
    brief["levels"] = [
        {k: v for k, v in lv.items() if k != "per_request"} for lv in report["levels"]
    ]
    print(json.dumps(brief))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["exit_code"] != 0 else 0


if __name__ == "__main__":
    sys.exit(main())

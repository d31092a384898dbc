"""`jaxtrain serve --hf` as a real server process answering real HTTP clients: concurrent
greedy requests get exactly the text of solo generation, streams add up to the whole
answer (the openai client reads them), chat uses the directory's template, and every bad
request gets its status and a JSON error while the server keeps serving."""

import asyncio
import json

import httpx
import numpy as np
import pytest
from helpers.cli import jaxtrain
from serving import Server, chat_model, sse_events

from jaxtrain.generate.api import Generator

NAME = "tiny"
MAX_LEN = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return chat_model(tmp_path_factory.mktemp("serve") / "llama")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    args = ["--hf", str(model_dir), "--name", NAME, "--max-batch", "8", "--max-queue", "32"]
    args += ["--max-len", str(MAX_LEN), "--prefill-chunk", "16"]
    srv = Server(*args, log=log)
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, log.read_text()[-2000:]


def complete(server, **body):
    return httpx.post(server.url + "/v1/completions", json=body, timeout=120)


def prompts(count: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens) pairs of different lengths; prompts over 16 characters take
    two prefill chunks."""
    rng = np.random.default_rng(0)
    words = ["the", "model", "trains", "on", "text", "and", "then", "it", "writes", "more"]
    out = []
    for i in range(count):
        text = " ".join(rng.choice(words, size=1 + i % 6))[: 1 + (i * 7) % 40]
        out.append((text, (8, 16)[i % 2]))
    return out


def test_health_waits_for_compilation(server):
    assert server.health_before_ready and set(server.health_before_ready) == {503}
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_concurrent_greedy_requests_equal_solo_generation(server, model_dir):
    cases = prompts(32)

    async def ask_all():
        async with httpx.AsyncClient(timeout=300) as client:
            calls = [
                client.post(server.url + "/v1/completions",
                            json={"prompt": p, "max_tokens": n, "temperature": 0})
                for p, n in cases
            ]  # fmt: skip
            return await asyncio.gather(*calls)

    replies = asyncio.run(ask_all())
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies][:3]
    served = [r.json()["choices"][0]["text"] for r in replies]
    generator = Generator.from_hf(str(model_dir))
    solo = [generator([p], max_new_tokens=n)[0] for p, n in cases]
    assert served == solo
    assert len(set(served)) > 8  # the prompts lead to different text
    usage = replies[3].json()["usage"]
    assert usage["prompt_tokens"] == len(cases[3][0])
    # The command line gives the same text for one of them.
    prompt, n = cases[5]
    proc = jaxtrain("generate", "--hf", str(model_dir), "--prompt", prompt,
                    "--max-new-tokens", str(n))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == prompt + served[5] + "\n"


def test_stream_adds_up_to_the_whole_answer_and_openai_reads_it(server):
    import openai

    prompt = "the model writes"
    whole = complete(server, prompt=prompt, max_tokens=16, temperature=0).json()
    with httpx.stream(
        "POST", server.url + "/v1/completions", timeout=120,
        json={"prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True,
              "stream_options": {"include_usage": True}},
    ) as response:  # fmt: skip
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == whole["choices"][0]["text"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["usage"] == whole["usage"]

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [NAME]
    stream = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == text

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=12, temperature=0
    )
    pieces = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert streamed == chat.choices[0].message.content
    # The template's prompt, continued as a completion, is the same text.
    rendered = "<system>be brief\n<user>hi\n<assistant>"
    same = complete(server, prompt=rendered, max_tokens=12, temperature=0).json()
    assert same["choices"][0]["text"] == chat.choices[0].message.content
    assert chat.usage.prompt_tokens == len(rendered)


def test_sampling_with_a_seed_repeats(server):
    body = {"prompt": "then it", "max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first, again = (complete(server, **body).json()["choices"][0]["text"] for _ in range(2))
    assert first == again
    others = {complete(server, **(body | {"seed": s})).json()["choices"][0]["text"]
              for s in range(4)}  # fmt: skip
    assert len(others) > 1


def test_stop_string_cuts_the_text(server):
    full = complete(server, prompt="the text", max_tokens=16, temperature=0).json()
    text = full["choices"][0]["text"]
    stop = text[5:7]
    cut = complete(server, prompt="the text", max_tokens=16, temperature=0, stop=[stop]).json()
    assert cut["choices"][0]["text"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


BAD = {
    "context too long": ({"prompt": "x" * 60, "max_tokens": 10}, 400, "max_tokens"),
    "unknown field": ({"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    "wrong type": ({"prompt": "hi", "max_tokens": "8"}, 400, "max_tokens"),
    "empty prompt": ({"prompt": ""}, 400, "prompt"),
    "several choices": ({"prompt": "hi", "n": 2}, 400, "n"),
    "temperature out of range": ({"prompt": "hi", "temperature": 3}, 400, "temperature"),
    "missing prompt": ({"max_tokens": 3}, 400, "prompt"),
    "another model": ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
}


@pytest.mark.parametrize("body,status,param", BAD.values(), ids=BAD.keys())
def test_bad_request_gets_its_status_and_the_server_keeps_serving(server, body, status, param):
    reply = complete(server, **body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"]
    assert complete(server, prompt="the", max_tokens=2, temperature=0).status_code == 200


@pytest.mark.parametrize(
    "content",
    [b'{"prompt": "\xff\xfe", "max_tokens": 2}', b"not json", b'["a list"]'],
    ids=["non-UTF-8", "not JSON", "not an object"],
)
def test_unreadable_body_is_a_400(server, content):
    reply = httpx.post(
        server.url + "/v1/completions", content=content,
        headers={"content-type": "application/json"}, timeout=60,
    )  # fmt: skip
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["message"]
    assert complete(server, prompt="the", max_tokens=2, temperature=0).status_code == 200


def test_chat_template_refusal_is_a_400(server):
    reply = httpx.post(
        server.url + "/v1/chat/completions", timeout=60,
        json={"messages": [{"role": "tool", "content": "x"}]},
    )  # fmt: skip
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages.0.role"


def test_metrics_count_requests_and_latencies(server):
    complete(server, prompt="a model", max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    ok = 'jaxtrain_requests_total{endpoint="/v1/completions",status="200"}'
    assert values[ok] >= 1
    assert values["jaxtrain_time_to_first_token_seconds_count"] >= 1
    assert values["jaxtrain_inter_token_latency_seconds_count"] >= 3
    assert values["jaxtrain_generated_tokens_total"] >= 4
    for gauge in ("jaxtrain_queue_length", "jaxtrain_batch_occupancy",
                  "jaxtrain_generated_tokens_per_second"):  # fmt: skip
        assert gauge in values
    assert json.loads(httpx.get(server.url + "/v1/models").text)["data"][0]["id"] == NAME
    # Every test so far (prompts of many lengths, greedy and sampled, streams, stops,
    # errors) ran on the programs compiled at start-up.
    assert server.compiles_after_ready() == []


def test_int8_model_serves_what_it_generates(model_dir, tmp_path):
    from jaxtrain import cli

    out = tmp_path / "int8"
    assert cli.main(["quantize", "--hf", str(model_dir), "--out", str(out)]) == 0
    srv = Server("--quantized", str(out), "--max-batch", "4", "--max-len", str(MAX_LEN),
                 "--prefill-chunk", "16", log=tmp_path / "server.log")  # fmt: skip
    try:
        srv.wait_ready()
        cases = prompts(6)

        async def ask_all():
            async with httpx.AsyncClient(timeout=300) as client:
                return await asyncio.gather(*[
                    client.post(srv.url + "/v1/completions",
                                json={"prompt": p, "max_tokens": n, "temperature": 0})
                    for p, n in cases
                ])  # fmt: skip

        served = [r.json()["choices"][0]["text"] for r in asyncio.run(ask_all())]
        generator = Generator.from_quantized(str(out))
        assert served == [generator([p], max_new_tokens=n)[0] for p, n in cases]
        chat = httpx.post(srv.url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
        })  # fmt: skip
        assert chat.status_code == 200, chat.text  # the template came along with the tokenizer
    finally:
        assert srv.stop() == 0


def test_bad_command_line_gets_one_line(tmp_path, capsys):
    import socket

    from serving import FIXTURES

    from jaxtrain import cli

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    port = str(taken.getsockname()[1])
    gpt2 = str(FIXTURES / "gpt2")
    cases = [
        (["--hf", gpt2, "--max-batch", "0"], "--max-batch"),
        (["--hf", gpt2, "--max-len", "100"], "--max-len"),  # 32 learned positions
        (["--hf", gpt2, "--port", port], "--port"),
        (["--hf", str(tmp_path)], "--hf"),
        (["--hf", gpt2, "--set", "train.steps=1"], "--set"),
    ]
    for args, key in cases:
        assert cli.main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"jaxtrain: error: {key}") and err.count("\n") == 1, err
    taken.close()

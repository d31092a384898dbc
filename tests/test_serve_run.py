"""`jaxtrain serve --run` on a model fresh out of `jaxtrain train` (8 simulated devices):
the API key, a full queue (429), a client that goes away (its row is freed), and SIGTERM
under load (the requests in flight finish, exit code 0)."""

import json
import threading
import time

import httpx
import pytest
from helpers.cli import SMALL, jaxtrain
from serving import Server, sse_events

KEY = "sesame"
AUTH = {"authorization": f"Bearer {KEY}"}
LONG = 1500  # new tokens: seconds of decoding on the tiny model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run = tmp_path_factory.mktemp("serve-run") / "run"
    sets = ["train.steps=3", "train.eval_every=0", f"run.dir={run}"]
    proc = jaxtrain("train", *SMALL, *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    args = ["--run", str(run), "--api-key", KEY, "--max-batch", "2", "--max-queue", "1"]
    args += ["--max-len", "2048", "--prefill-chunk", "64"]
    srv = Server(*args, log=run.parent / "server.log")
    srv.wait_ready()
    yield srv
    srv.stop()


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", headers=AUTH).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


class Stream(threading.Thread):
    """A streaming completion read on its own thread: ``started`` once its first event
    arrives; ``events`` and ``done`` ([DONE] seen) at the end. ``close()`` hangs up."""

    def __init__(self, server, max_tokens: int, prompt: str = "x"):
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.prompt = server.url, max_tokens, prompt
        self.started, self.closing = threading.Event(), threading.Event()
        self.events, self.done, self.status, self.error = [], False, None, None
        self.start()

    def run(self):
        try:
            self._read()
        except Exception as err:  # reported by the test that waits on it
            self.error = err
            raise

    def _read(self):
        body = {"prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx.stream("POST", self.url + "/v1/completions", json=body, headers=AUTH,
                          timeout=120) as response:  # fmt: skip
            self.status = response.status_code
            for line in response.iter_lines():
                if self.closing.is_set():
                    return  # leaving the block closes the connection
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))
                    self.started.set()

    def close(self):
        self.closing.set()
        self.join(30)


def test_api_key_guards_everything_but_health(server):
    assert httpx.get(server.url + "/health").status_code == 200
    for headers in ({}, {"authorization": "Bearer wrong"}):
        reply = httpx.get(server.url + "/v1/models", headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/v1/models", headers=AUTH).status_code == 200


def test_chat_without_a_template_is_a_400(server):
    reply = httpx.post(
        server.url + "/v1/chat/completions", headers=AUTH, timeout=60,
        json={"messages": [{"role": "user", "content": "hi"}]},
    )  # fmt: skip
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "no_chat_template"


def test_full_queue_is_a_429_and_a_client_that_hangs_up_frees_its_row(server):
    running = [Stream(server, LONG), Stream(server, LONG)]
    for stream in running:
        assert stream.started.wait(60), (stream.status, stream.error)
    queued = Stream(server, LONG)
    wait_for(lambda: metric(server, "jaxtrain_queue_length") == 1)
    reply = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60,
                       json={"prompt": "x", "max_tokens": 2})  # fmt: skip
    assert reply.status_code == 429 and reply.json()["error"]["type"] == "rate_limit_error"
    # Two clients hang up mid-stream: their rows go to the waiting one and then stay free.
    for stream in running:
        stream.close()
        assert not stream.done
    assert queued.started.wait(60)
    wait_for(lambda: metric(server, "jaxtrain_batch_occupancy") == 0.5)
    queued.close()
    wait_for(lambda: metric(server, "jaxtrain_batch_occupancy") == 0.0)
    reply = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=60,
                       json={"prompt": "x", "max_tokens": 2, "temperature": 0})  # fmt: skip
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(server):
    """Last in this file: it stops the module's server."""
    streams = [Stream(server, 300, prompt=p) for p in ("x", "hello")]
    for stream in streams:
        assert stream.started.wait(60)
    streams.append(Stream(server, 40, prompt="the"))  # waits for a row
    wait_for(lambda: metric(server, "jaxtrain_queue_length") == 1)
    server.proc.terminate()
    for stream in streams:
        stream.join(120)
        assert stream.status == 200 and stream.done
        usage = stream.events[-1]["usage"]
        finish = [e["choices"][0]["finish_reason"] for e in stream.events if e["choices"]][-1]
        assert finish == "stop" or usage["completion_tokens"] == stream.max_tokens
    assert server.proc.wait(60) == 0, server.log.read_text()[-2000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)
    assert sse_events  # the SSE parser of the other serve tests reads these streams too

"""The trace reader of ``benchmarks/trace_occupancy.py``, on a trace written here: two
worker threads whose operations overlap for a known time."""

import gzip
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "trace_occupancy.py"


def load():
    spec = importlib.util.spec_from_file_location("trace_occupancy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def span(tid, name, start_ms, length_ms):
    return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": start_ms * 1e3,
            "dur": length_ms * 1e3}  # fmt: skip


def test_occupancy_of_a_written_trace(tmp_path, capsys):
    occupancy = load()
    assert occupancy.union_length([(0, 4), (2, 6), (8, 9)]) == 7
    assert occupancy.overlap([(0, 4), (8, 9)], 3, 9) == 2
    threads = [
        {"ph": "M", "pid": 1, "tid": t, "name": "thread_name", "args": {"name": name}}
        for t, name in ((1, "tf_XLAEigen/a"), (2, "tf_XLAEigen/b"), (3, "python"))
    ]
    events = [
        *threads,
        span(3, "ThunkExecutor::Execute (wait for completion)", 0, 1000),
        span(1, "ThunkExecutor::Execute", 0, 1000),  # not an operation
        span(1, "head_dot", 0, 600),  # alone for its first 400 ms
        span(2, "exp_fusion", 400, 300),  # with head_dot for 200 ms, then alone 100 ms
    ]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    (folder / "host.trace.json.gz").write_bytes(
        gzip.compress(json.dumps({"traceEvents": events}).encode())
    )
    assert occupancy.main([str(tmp_path), "--min-ms", "250"]) == 0
    out = capsys.readouterr().out
    assert "both threads in an operation 0.20 s, one 0.50 s, none 0.30 s" in out
    assert "0.400  head_dot" in out and "0.100  exp_fusion" in out
    assert "0.400  0.300  T1  exp_fusion" in out

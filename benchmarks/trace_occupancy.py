"""How busy XLA:CPU's worker threads are in a profiled train step.

Reads the ``jax.profiler`` trace that ``benchmarks/jax_run.py --profile DIR`` writes and
prints, over the profiled steps, how long both, one or none of the XLA worker threads
(``tf_XLAEigen``) were inside an operation, which operations ran while the other thread
had none, and the timeline of the last step's long operations.

    python benchmarks/trace_occupancy.py DIR [--min-ms 100]

Work that an operation hands to other threads through its own thread pool (YNNPACK's
dot fusions do) is not traced as an operation there, so "one thread" is an upper bound
on the time one core did the work alone.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path

STEP = "ThunkExecutor::Execute (wait for completion)"
NOT_OPS = ("ThunkExecutor", "Threadpool", "Slinky", "end:", "$")


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``intervals`` (start, end), overlaps counted once."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def overlap(intervals: list[tuple[float, float]], start: float, stop: float) -> float:
    """Length of [start, stop) covered by the sorted, disjoint-enough ``intervals``."""
    return sum(max(0.0, min(b, stop) - max(a, start)) for a, b in intervals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir", type=Path)
    parser.add_argument("--min-ms", type=float, default=100.0, help="timeline threshold")
    args = parser.parse_args(argv)
    path = max(args.trace_dir.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    names = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    spans = [e for e in events if e.get("ph") == "X"]
    steps = sorted((e for e in spans if e["name"] == STEP), key=lambda e: e["ts"])
    ops = collections.defaultdict(list)  # thread -> its operations
    for e in spans:
        thread = names.get((e["pid"], e["tid"]), "")
        if thread.startswith("tf_XLAEigen") and not e["name"].startswith(NOT_OPS):
            ops[thread].append(e)
    if len(ops) != 2 or not steps:
        raise SystemExit(f"{path}: expected profiled steps on 2 XLA worker threads")
    busy = {t: sorted((e["ts"], e["ts"] + e["dur"]) for e in evs) for t, evs in ops.items()}
    wall = sum(e["dur"] for e in steps) / 1e6
    each = {t: union_length(iv) / 1e6 for t, iv in busy.items()}
    either = union_length([iv for ivs in busy.values() for iv in ivs]) / 1e6
    both = sum(each.values()) - either
    n = len(steps)
    print(
        f"{n} steps, {wall / n:.2f} s each; per step: both threads in an operation "
        f"{both / n:.2f} s, one {(either - both) / n:.2f} s, none {(wall - either) / n:.2f} s"
    )

    alone = collections.Counter()
    for thread, evs in ops.items():
        (other,) = (busy[t] for t in busy if t != thread)
        for e in evs:
            alone[e["name"]] += (e["dur"] - overlap(other, e["ts"], e["ts"] + e["dur"])) / 1e6 / n
    print("operations while the other thread had none (s per step):")
    for name, seconds in alone.most_common(12):
        print(f"  {seconds:6.3f}  {name}")

    last = steps[-1]
    start, stop = last["ts"], last["ts"] + last["dur"]
    column = {t: i for i, t in enumerate(sorted(ops))}
    print(f"last step's operations of at least {args.min_ms:g} ms (start s, length s, thread):")
    timeline = [
        (e["ts"], e, column[t])
        for t, evs in ops.items()
        for e in evs
        if start <= e["ts"] < stop and e["dur"] >= args.min_ms * 1e3
    ]
    for ts, e, col in sorted(timeline, key=lambda row: row[0]):
        print(f"  {(ts - start) / 1e6:7.3f} {e['dur'] / 1e6:6.3f}  T{col}  {e['name']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

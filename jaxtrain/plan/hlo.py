"""Collective traffic of a compiled program, read from its optimized HLO text.

Every collective op is counted once per execution: an op inside a ``while`` body (a
scanned layer stack, the microbatch loop) counts ``known_trip_count`` times, nested loops
multiply. The bytes of an op are the size of the whole array it exchanges, per device:
an all-gather's result, a reduce-scatter's operand, an all-reduce's, all-to-all's or
permute's result (for a tuple, the sum of its elements).

XLA:CPU widens bfloat16 collectives to float32 and float8 ones to float16 (a convert on
each side), so ``program_bytes`` also counts each op at the dtype the program asked for:
an f32 op whose operand was converted from bf16, or an f16 op whose operand was
converted from float8, counts half. XLA:CPU also writes a reduce-scatter as an
all-reduce followed by a slice; on CPU such reductions appear as all-reduce.

A collective whose every replica group is one device (``{{0},{1},...}``, or a mesh group
over axes of size 1: what ``shard_map``'s transpose emits for a sum over axes that split
nothing) moves no bytes and is not counted.
"""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_ITEMSIZE = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_CALLEE = re.compile(
    r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_GROUPS = re.compile(r"replica_groups=\{(\{[^}]*\})")  # the first explicit group
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")  # [groups, size]<=[...]


@dataclasses.dataclass
class Traffic:
    """One kind of collective: how many ops ran and the bytes they moved per device."""

    ops: int = 0
    bytes: int = 0
    program_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    type: str
    opcode: str
    rest: str


def array_bytes(type_text: str) -> int:
    """Bytes of an HLO type: ``f32[2,3]{1,0}`` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype in _ITEMSIZE:
            shape = [int(d) for d in dims.split(",") if d]
            total += math.prod(shape) * _ITEMSIZE[dtype]
    return total


def _parse(text: str) -> tuple[dict[str, list[_Instruction]], list[str], str | None]:
    """(instructions per computation, computations in text order, the entry's name)."""
    computations: dict[str, list[_Instruction]] = {}
    order: list[str] = []
    entry = current = None
    for line in text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match and "=" not in line.split("(")[0]:
                current = match[1]
                computations[current] = []
                order.append(current)
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            computations[current].append(_Instruction(*match.groups()))
    return computations, order, entry


def _multipliers(
    computations: dict[str, list[_Instruction]], order: list[str], entry: str | None
) -> dict[str, int]:
    """How many times each computation runs per execution of the entry."""
    runs = dict.fromkeys(computations, 0)
    if entry is None:
        return runs
    runs[entry] = 1
    # Callees are printed before their callers: walk from the entry backwards.
    for name in reversed(order):
        if not runs[name]:
            continue
        for inst in computations[name]:
            trip = _TRIP.search(inst.rest)
            for role, callee in _CALLEE.findall(inst.rest):
                if callee in runs:
                    loop = role in ("body", "condition") and inst.opcode == "while"
                    runs[callee] += runs[name] * (int(trip[1]) if loop and trip else 1)
            for group in _BRANCHES.findall(inst.rest):
                for callee in re.findall(r"%([\w.\-]+)", group):
                    if callee in runs:
                        runs[callee] += runs[name]
    return runs


# XLA:CPU's widenings: the type a collective runs in -> the narrower one it came from.
_WIDENINGS = {"f32[": ("bf16",), "f16[": ("f8e4m3fn", "f8e5m2")}


def _widened(inst: _Instruction, types: dict[str, _Instruction], computations) -> bool:
    """Whether a collective's operand was converted up from a type half as wide
    (XLA:CPU's widening: bf16 to f32, float8 to f16)."""
    wide = next((w for w in _WIDENINGS if re.search(rf"(?<![a-z]){re.escape(w)}", inst.type)), None)
    if wide is None:
        return False
    narrow = _WIDENINGS[wide]
    first = re.match(r"\s*%([\w.\-]+)", inst.rest)
    producer = types.get(first[1]) if first else None
    if producer is None:
        return False
    if producer.opcode == "convert":
        source = re.match(r"\s*%([\w.\-]+)", producer.rest)
        return bool(source) and types.get(source[1], producer).type.startswith(narrow)
    if producer.opcode == "fusion":
        callee = re.search(r"calls=%([\w.\-]+)", producer.rest)
        body = computations.get(callee[1], []) if callee else []
        return any(i.type.startswith(narrow) for i in body) and any(
            i.opcode == "convert" and i.type.startswith(wide) for i in body
        )
    return False


def _alone(inst: _Instruction) -> bool:
    """Whether every replica group of a collective is a single device."""
    explicit = _GROUPS.search(inst.rest)
    if explicit:
        return "," not in explicit[1]
    mesh = _MESH_GROUPS.search(inst.rest)
    if mesh:
        sizes = dict(re.findall(r"'([\w]+)'=(\d+)", mesh[1]))
        over = re.findall(r"'([\w]+)'", mesh[2])
        return math.prod(int(sizes.get(a, 1)) for a in over) == 1
    iota = _IOTA_GROUPS.search(inst.rest)
    return bool(iota) and iota[1] == "1"


def collective_traffic(hlo_text: str) -> dict[str, Traffic]:
    """Per-device collective traffic of one execution of an optimized HLO module."""
    computations, order, entry = _parse(hlo_text)
    runs = _multipliers(computations, order, entry)
    types = {inst.name: inst for body in computations.values() for inst in body}
    traffic = {kind: Traffic() for kind in KINDS}
    for name, body in computations.items():
        for inst in body:
            kind = inst.opcode.removesuffix("-start")
            if kind not in traffic or not runs[name] or _alone(inst):
                continue
            operands = re.findall(r"%([\w.\-]+)", inst.rest.split(")")[0])
            operand_bytes = sum(array_bytes(types[o].type) for o in operands if o in types)
            if kind == "reduce-scatter":
                size = operand_bytes
            elif inst.opcode.endswith("-start") and kind != "all-reduce":
                size = array_bytes(inst.type) - operand_bytes  # (operands, results) tuple
            else:
                size = array_bytes(inst.type)
            count = runs[name]
            program = size // 2 if _widened(inst, types, computations) else size
            traffic[kind].ops += count
            traffic[kind].bytes += count * size
            traffic[kind].program_bytes += count * program
    return traffic

"""`jaxtrain plan`: the HLO traffic count, ZeRO's ideal, memory by category, the fit
search and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from helpers.runs import ACCUMULATING
from rich.console import Console
from tiny import TINY

from jaxtrain import config
from jaxtrain.cli import main
from jaxtrain.errors import UserError
from jaxtrain.plan.fit import apply, candidates
from jaxtrain.plan.hlo import array_bytes, collective_traffic
from jaxtrain.plan.remat import print_remat
from jaxtrain.plan.report import make_plan
from jaxtrain.plan.sizes import parse_size
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program

HLO = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%widen (p: bf16[4,8]) -> f32[4,8] {
  %p = bf16[4,8]{1,0} parameter(0)
  ROOT %c = f32[4,8]{1,0} convert(%p)
}

%ib (t: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %t = (s32[], f32[8,8]{1,0}) parameter(0)
  %x = f32[8,8]{1,0} get-tuple-element(%t), index=1
  %ar = f32[8,8]{1,0} all-reduce(%x), channel_id=1, to_apply=%add
  %alone = f32[8,8]{1,0} all-reduce(%ar), channel_id=4, replica_groups={{0},{1}}, to_apply=%add
  %m = f32[8,8]{1,0} all-reduce(%alone), replica_groups=MESH1, to_apply=%add
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %r = (s32[], f32[8,8]{1,0}) tuple(%i, %ar)
}

%ic (t: (s32[], f32[8,8])) -> pred[] {
  %t = (s32[], f32[8,8]{1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

%ob (t: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %t = (s32[], bf16[4,8]{1,0}) parameter(0)
  %y = bf16[4,8]{1,0} get-tuple-element(%t), index=1
  %w = f32[4,8]{1,0} fusion(%y), kind=kLoop, calls=%widen
  %ag = f32[32,8]{1,0} all-gather(%w), channel_id=2, dimensions={0}
  %z = f32[8,8]{1,0} slice(%ag), slice={[0:8], [0:8]}
  %i = s32[] get-tuple-element(%t), index=0
  %u = (s32[], f32[8,8]{1,0}) tuple(%i, %z)
  %loop = (s32[], f32[8,8]{1,0}) while(%u), condition=%ic, body=%ib, backend_config=TRIP5
  ROOT %r = (s32[], bf16[4,8]{1,0}) tuple(%i, %y)
}

%oc (t: (s32[], bf16[4,8])) -> pred[] {
  %t = (s32[], bf16[4,8]{1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (x: f32[64,8], y: bf16[4,8]) -> f32[8,8] {
  %x = f32[64,8]{1,0} parameter(0)
  %rs = f32[8,8]{1,0} reduce-scatter(%x), channel_id=3, dimensions={0}, to_apply=%add
  %y = bf16[4,8]{1,0} parameter(1)
  %i = s32[] constant(0)
  %t = (s32[], bf16[4,8]{1,0}) tuple(%i, %y)
  %loop = (s32[], bf16[4,8]{1,0}) while(%t), condition=%oc, body=%ob, backend_config=TRIP3
  ROOT %o = f32[8,8]{1,0} copy(%rs)
}
"""
HLO = HLO.replace("TRIP5", '{"known_trip_count":{"n":"5"}}')
HLO = HLO.replace("TRIP3", '{"known_trip_count":{"n":"3"}}')
HLO = HLO.replace("MESH1", "mesh['axis_0'=2,'axis_1'=1] {'axis_1'}")


def test_hlo_traffic_counts_loops_trip_count_times():
    traffic = collective_traffic(HLO)
    # reduce-scatter: its operand, once.
    assert (traffic["reduce-scatter"].ops, traffic["reduce-scatter"].bytes) == (1, 64 * 8 * 4)
    # all-gather: 3 outer iterations of a 32x8 f32 result, widened from bf16.
    gather = traffic["all-gather"]
    assert (gather.ops, gather.bytes, gather.program_bytes) == (3, 3 * 1024, 3 * 512)
    # all-reduce: 5 inner x 3 outer iterations; its f32 operand is not widened. The two
    # whose groups are single devices (explicit, and over a mesh axis of size 1) move
    # nothing.
    reduce = traffic["all-reduce"]
    assert (reduce.ops, reduce.bytes, reduce.program_bytes) == (15, 15 * 256, 15 * 256)
    assert traffic["all-to-all"].ops == traffic["collective-permute"].ops == 0


def test_array_bytes_of_tuples():
    assert array_bytes("(f32[2,3]{1,0}, bf16[4]{0}, s32[])") == 24 + 8 + 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [("80GiB", 80 * 2**30), ("16 GB", 16 * 10**9), ("24", 24 * 2**30), ("1.5g", 3 * 2**29)],
)
def test_parse_size(text, expected):
    assert parse_size(text, "--hbm") == expected


@pytest.mark.parametrize("text", ["", "-3GiB", "80 parsecs", "0"])
def test_parse_size_refuses(text):
    with pytest.raises(UserError, match="--hbm: expected a size"):
        parse_size(text, "--hbm")


@pytest.fixture(scope="module")
def tiny_plan():
    cfg = config.load(None, ACCUMULATING)
    program = build_program(cfg, make_mesh(cfg))
    return program, make_plan(program)


def test_memory_categories_add_up(tiny_plan):
    program, plan = tiny_plan
    mem = plan.memory
    n_params = sum(p.size for p in jax.tree.leaves(program.abstract_state.params))
    # float32, sharded 8 ways (fsdp) but for the few small vectors kept whole
    assert n_params * 4 // 8 <= mem.parameters < 1.02 * n_params * 4 // 8
    assert mem.optimizer == pytest.approx(2 * mem.parameters, rel=0.01)  # AdamW moments
    assert mem.gradients == mem.parameters  # float32 gradients laid out like parameters
    assert mem.arguments >= mem.parameters + mem.optimizer
    assert mem.peak == mem.arguments + mem.outputs + mem.temporaries - mem.aliased
    assert mem.temporaries > 0


def test_traffic_is_at_least_zero_ideal(tiny_plan):
    _, plan = tiny_plan
    ideal = plan.ideal
    assert ideal.gather > 0 and ideal.reduce_scatter > 0
    # bf16 gathers (2 passes) and float32 reductions of the same parameters.
    assert ideal.gather == ideal.reduce_scatter
    gathered = plan.traffic["all-gather"].program_bytes
    assert gathered >= ideal.gather * 0.9
    assert plan.moved >= ideal.total * 0.9


def test_local_accumulation_reduces_once_per_step(tiny_plan):
    """train.grad_accumulation=local: one reduction per step instead of one per
    microbatch, the same gathers, and a whole float32 gradient sum per device."""
    program, sharded = tiny_plan
    cfg = config.load(None, [*ACCUMULATING, "train.grad_accumulation=local"])
    local = make_plan(build_program(cfg, make_mesh(cfg)))
    assert (sharded.accumulation, local.accumulation) == ("sharded", "local")
    n_params = sum(p.size for p in jax.tree.leaves(program.abstract_state.params))
    assert local.memory.gradients == n_params * 4  # not split over the 8 batch shards

    def reduced(plan):
        return sum(plan.traffic[k].program_bytes for k in ("reduce-scatter", "all-reduce"))

    ideal = sharded.ideal.reduce_scatter + sharded.ideal.all_reduce
    assert reduced(sharded) >= 2 * 0.9 * ideal  # once per microbatch
    assert 0.9 * ideal <= reduced(local) <= 1.1 * ideal
    gathered = {p.traffic["all-gather"].program_bytes for p in (sharded, local)}
    assert max(gathered) <= 1.05 * min(gathered)
    assert local.memory.temporaries > sharded.memory.temporaries


def test_candidates_cheapest_first():
    cfg = config.load(None, ["mesh.data=2", "model.remat=none", "train.global_batch=16"])
    whys = [c.why for c in candidates(cfg, 8)]
    assert whys[0] == "shard the state over the data ways too"
    assert whys[1] == "rematerialise every layer"
    assert whys[2:4] == ["2 microbatches", "4 microbatches"]
    assert whys[4] == "context parallel over 2 (the length split)"
    assert whys[5] == "tensor parallel over 2" and whys[-1] == "all of the above"
    first, *_, context, tensor, everything = candidates(cfg, 8)
    assert tensor.overrides == ("mesh.preset=fsdp_tp", "mesh.tensor=2")  # fsdp fills
    assert first.overrides == ("mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1")
    assert context.overrides == ("mesh.fsdp=2", "mesh.sequence=2")
    assert not any("sequence" in o for o in everything.overrides)
    local = config.load(None, ["train.microbatches=2", "train.grad_accumulation=local"])
    assert candidates(local, 8)[0].overrides == ("train.grad_accumulation=sharded",)
    # A fixed fsdp gives the new tensor ways their devices instead of asking for 16.
    fixed = config.load(None, ["mesh.fsdp=4", "mesh.sequence=2"])
    tensor = next(c for c in candidates(fixed, 8) if c.why.startswith("tensor"))
    assert tensor.overrides == ("mesh.preset=fsdp_tp", "mesh.fsdp=-1", "mesh.tensor=2")
    sizes = apply(fixed, tensor).check_devices(8)
    assert (sizes["fsdp"], sizes["sequence"], sizes["tensor"]) == (2, 2, 2)


def jaxtrain_plan(*args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "jaxtrain.cli", "plan", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def test_plan_json_on_simulated_devices_and_fit_search(tiny_plan):
    """--devices re-runs itself on that many CPU devices; an --hbm that the step does not
    fit makes it compile changes and name the cheapest that fits."""
    _, base = tiny_plan
    hbm = int(base.memory.peak * 0.95)  # with 10% headroom this step does not fit
    sets = [a for s in ACCUMULATING for a in ("--set", s)]
    proc = jaxtrain_plan(*sets, "--devices", "8", "--hbm", f"{hbm}B", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    assert plan["devices"] == 8 and plan["platform"] == "cpu"
    assert plan["memory_bytes_per_device"]["peak"] == base.memory.peak
    assert plan["fits"] is False
    suggestion = plan["suggestion"]
    assert suggestion is not None, plan
    assert suggestion["plan"]["memory_bytes_per_device"]["peak"] <= 0.9 * hbm


def test_plan_table_and_one_line_errors(tmp_path):
    proc = jaxtrain_plan("--set", "model.n_layers=2", "--hbm", "4GiB", "--devices", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 cpu devices" in proc.stdout
    for text in ("memory per device", "temporaries", "peak", "all-gather", "ZeRO ideal", "fits:"):
        assert text in proc.stdout, text

    proc = jaxtrain_plan("--hbm", "lots")
    assert proc.returncode == 2
    assert proc.stderr.startswith("jaxtrain: error: --hbm: expected a size")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_plan_remat_orders_the_policies_by_what_they_save(capsys):
    """``jaxtrain plan --remat``: saving less needs fewer temporaries (the tiny model's
    programs, which test_remat.py compiles too; in process, on the 8 test devices)."""
    sets = [a for s in TINY for a in ("--set", s)]
    assert main(["plan", *sets, "--remat", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["remat"]
    temps = {row["remat"]: row["temporaries"] for row in rows}
    assert list(temps) == list(config.REMAT_POLICIES)
    assert temps["full"] < temps["save_qkvo_proj"] < temps["dots_saveable"] < temps["none"]
    assert temps["save_dots_except_mlp_in"] == temps["save_qkvo_proj"]  # see models/remat.py
    assert {row["fits"] for row in rows} <= {True, None}  # tiny, in this machine's memory
    console = Console(record=True, width=200)
    print_remat(rows, console, "none", "cpu")
    table = console.export_text()
    assert "none (this config)" in table and "offload_dots keeps its saved" in table


def test_context_parallel_divides_activation_memory():
    """Two rows of 1024 tokens on 2 devices (fsdp), then on 8 with the length split 4
    ways: the step's temporaries (activations, logits, gradients) fall about 4x (4.4x)."""
    base = ["model.max_seq_len=1024", "data.seq_len=1024", "train.global_batch=2", "mesh.fsdp=2"]
    temporaries = {}
    for ways, devices in ((1, 2), (4, 8)):
        cfg = config.load(None, [*base, f"mesh.sequence={ways}"])
        program = build_program(cfg, make_mesh(cfg, jax.devices()[:devices]))
        temporaries[ways] = make_plan(program).memory.temporaries
    assert temporaries[4] < temporaries[1] / 3, temporaries

"""Pipeline parallelism (``mesh.stage``): training steps give one device's losses and
parameters (with the same microbatches) on stage x fsdp, stage x tensor, stage alone and
stage x data x fsdp, packed and not, GPipe and circular (``mesh.pipeline_repeats``),
LLaMA and GPT-2; the compiled step moves activations between neighbouring stages and
never gathers another stage's layers; checkpoints move between stage counts and
schedules; and configs that cannot pipeline are refused in one line.

A dropped stage fails the comparison: with the last stage passing its input on
untouched, stage2_fsdp4's losses were 4.4e-4 off and its updates 0.97 of their scale."""

import collections
import functools
import re

import jax
import numpy as np
import pytest
from helpers.bounds import F32
from helpers.runs import STEPS, assert_same_run, packed_batches, random_batches, train
from rich.console import Console

from jaxtrain import config
from jaxtrain.checkpoint import Checkpointer
from jaxtrain.errors import UserError
from jaxtrain.generate.api import Generator
from jaxtrain.models.pipeline import bubble_fraction, layer_order, microbatch_count
from jaxtrain.plan.hlo import _parse
from jaxtrain.plan.report import make_plan
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program
from jaxtrain.train.layer_order import permutation, record
from jaxtrain.train.loop import loss_curve
from jaxtrain.train.loop import train as train_run

# A length (24) that no weight dimension shares, so gathered activations and weights differ.
PIPE = (*STEPS, "model.n_layers=8", "train.global_batch=32", "data.seq_len=24")
GPT2 = ("model.family=gpt2", "model.n_kv_heads=4", "model.tie_embeddings=true")

# layout -> (overrides, microbatches, packed)
LAYOUTS = {
    "stage2_fsdp4": (("mesh.stage=2", "mesh.fsdp=4"), 4, False),
    "stage4_tensor2": (
        ("mesh.preset=fsdp_tp", "mesh.stage=4", "mesh.tensor=2", "mesh.fsdp=1"),
        8,
        True,
    ),
    "stage8": (("mesh.stage=8", "mesh.fsdp=1"), 8, True),
    "stage2_data2_fsdp2": (("mesh.stage=2", "mesh.data=2", "mesh.fsdp=2"), 4, True),
    # Circular: every microbatch passes through the stages twice.
    "stage2_fsdp4_repeats2": (("mesh.stage=2", "mesh.fsdp=4", "mesh.pipeline_repeats=2"), 4, False),
    "stage4_tensor2_repeats2": (
        ("mesh.preset=fsdp_tp", "mesh.stage=4", "mesh.tensor=2", "mesh.fsdp=1")
        + ("mesh.pipeline_repeats=2",),
        8,
        True,
    ),
}


def program_for(overrides, devices, family=()):
    cfg = config.load(None, [*PIPE, *family, *overrides])
    return build_program(cfg, make_mesh(cfg, devices))


def batches(program, packed):
    n = program.config.train.steps
    return packed_batches(program, n) if packed else random_batches(program, n)


@functools.cache
def one_device(microbatches, packed, family=()):
    extra = (f"train.microbatches={microbatches}", "mesh.fsdp=1")
    extra += ("data.packing=true",) * packed
    program = program_for(extra, jax.devices()[:1], family)
    return train(program, batches(program, packed))


@functools.cache
def pipelined(layout, family=()):
    overrides, micro, packed = LAYOUTS[layout]
    extra = (*overrides, f"train.microbatches={micro}", *("data.packing=true",) * packed)
    program = program_for(extra, jax.devices(), family)
    return train(program, batches(program, packed)), program


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pipelined_steps_equal_one_device(layout):
    _, micro, packed = LAYOUTS[layout]
    result, program = pipelined(layout)
    assert program.spec.stages == program.mesh.shape["stage"] > 1
    assert program.spec.repeats == program.config.mesh.pipeline_repeats
    assert program.pipeline_schedule() == (program.spec.stages, micro)
    assert_same_run(result, one_device(micro, packed))


def test_flash_kernel_runs_inside_the_stages():
    """``model.attention=pallas`` (the flash kernel, interpreted on CPU) inside the stages:
    the kernel's per-shard call is mapped over the stage axis with the rest of a stage's
    work, and the circular pipeline's losses are one device's (whose attention is the
    reference)."""
    overrides, micro, packed = LAYOUTS["stage2_fsdp4_repeats2"]
    extra = (*overrides, f"train.microbatches={micro}", "model.attention=pallas")
    program = program_for(extra, jax.devices())
    step = jax.make_jaxpr(program.train_step)
    jaxpr = str(step(program.abstract_state, program.abstract_batch()))
    assert "pallas_call" in jaxpr
    losses = train(program, batches(program, packed)).losses
    np.testing.assert_allclose(losses, one_device(micro, packed).losses, rtol=F32)


def test_gpt2_pipelined_equals_one_device():
    """GPT-2 (learned positions, biases, LayerNorm): the same losses and updates."""
    result, _ = pipelined("stage2_fsdp4", GPT2)
    assert_same_run(result, one_device(4, False, GPT2))


def stage_of(program):
    """Device id -> its stage's index in the program's mesh."""
    names = program.mesh.axis_names
    grid = program.mesh.devices
    return {d.id: int(idx[names.index("stage")]) for idx, d in np.ndenumerate(grid)}


def loop_collectives(computations, entry):
    """(opcode, result type) -> count, of the collectives inside the step's loops."""
    return collections.Counter(
        (inst.opcode, inst.type)
        for name, body in computations.items()
        if name != entry
        for inst in body
        if inst.opcode.startswith(("all-", "collective-", "reduce-scatter"))
    )


@pytest.mark.parametrize("layout", ["stage2_fsdp4", "stage8", "stage4_tensor2_repeats2"])
def test_stages_send_activations_to_neighbours_and_gather_no_layers(layout):
    """Every collective-permute in the compiled step's loops connects neighbouring stages
    (the activations' shift, forward and back), and no all-gather yields a whole stack of
    layers [n, ...]; with one stage per device (stage8) not even one layer's weight. A
    circular schedule's loops run the same collectives as GPipe's on the same layout:
    its passes' hand-back rides the shift."""
    _, program = pipelined(layout)
    hlo = program.compile()[0].as_text()
    stage, stages = stage_of(program), program.spec.stages
    # The shifts run inside the tick loop (outside it, XLA may reshuffle the embedding
    # table or token ids for the lookup); they move activations.
    computations, _, entry = _parse(hlo)
    if program.spec.repeats > 1:
        gpipe = pipelined(layout.removesuffix("_repeats2"))[1].compile()[0].as_text()
        assert loop_collectives(computations, entry) == loop_collectives(*_parse(gpipe)[::2])
    permutes = [
        re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)+)\}", inst.rest)[1]
        for name, body in computations.items()
        if name != entry
        for inst in body
        if inst.opcode in ("collective-permute", "collective-permute-start")
        and inst.type.startswith(("f", "bf"))
    ]
    assert permutes
    for pairs in permutes:
        for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs):
            assert (stage[int(b)] - stage[int(a)]) % stages in (1, stages - 1), pairs
    stacked = [leaf.shape for leaf in jax.tree.leaves(program.spec.abstract_params["blocks"])]
    forbidden = {tuple(s) for s in stacked}
    if stages == program.mesh.devices.size:
        forbidden |= {tuple(s[1:]) for s in stacked} | {(1, *s[1:]) for s in stacked}
    gathered = [
        tuple(int(d) for d in re.match(r"\w+\[([\d,]*)\]", inst.type)[1].split(",") if d)
        for body in computations.values()
        for inst in body
        if inst.opcode in ("all-gather", "all-gather-start") and "[" in inst.type
    ]
    assert not forbidden & set(gathered), forbidden & set(gathered)


@pytest.mark.parametrize("repeats", [1, 2])
def test_checkpoints_move_between_stage_counts(tmp_path, repeats):
    """Saved at stage=4, restored at stage=1 (one device) and then stage=2: each
    restored run continues with the losses of a run that never stopped. With repeats,
    the pipelined checkpoints hold their layers in circular order, which restoring
    puts into the order of the layout it restores to."""
    micro = 4
    base = (f"train.microbatches={micro}",)
    circular = (f"mesh.pipeline_repeats={repeats}",)
    layouts = [
        (("mesh.stage=4", "mesh.fsdp=2", *circular), jax.devices()),
        (("mesh.fsdp=1",), jax.devices()[:1]),
        (("mesh.stage=2", "mesh.fsdp=4", *circular), jax.devices()),
    ]
    reference = one_device(micro, False).losses
    checkpointer = Checkpointer(tmp_path / "checkpoints", config.CheckpointConfig())
    state, losses = None, []
    for step, (overrides, devices) in enumerate(layouts):
        program = program_for((*base, *overrides), devices)
        if state is not None:
            state = program.adopt(*checkpointer.restore(step, program.abstract_state))
        batch = random_batches(program, 3)[step]
        fresh = program.init_state() if state is None else state
        state, metrics = program.train_step(fresh, jax.device_put(batch, program.batch_sharding))
        losses.append(float(metrics["loss"]))
        checkpointer.save(step + 1, state, program.config, record(program.spec.layout()))
        checkpointer.wait()
    checkpointer.close()
    np.testing.assert_allclose(losses, reference, rtol=F32)


def test_a_circular_run_resumes_without_stages(tmp_path):
    """The training loop: the start-up line gives the circular schedule's bubble, each
    checkpoint records the stored layer order, generation from the run reads the layers
    in the model's order, and a run saved with stage=2 x 2 repeats resumes with no
    stages at the loss of a run that never had any."""
    base = [*PIPE, "model.vocab_size=512", "train.microbatches=4", "checkpoint.every=2"]
    base += ["train.log_every=1", "train.eval_every=0", "checkpoint.async_save=false"]
    base += ["sample.max_new_tokens=0"]
    circular = ["mesh.stage=2", "mesh.fsdp=4", "mesh.pipeline_repeats=2", "train.steps=2"]
    plain = ["mesh.fsdp=8", "train.steps=3"]
    console = Console(record=True, width=300)
    cut = config.load(None, [*base, *circular, f"run.dir={tmp_path / 'cut'}"])
    saved = train_run(cut, console)
    said = console.export_text()
    assert "pipeline: 2 stages x 4 microbatches (circular, 2 repeats): bubble" in said
    assert "= 11.1% of stage time" in said  # (S-1)/(M R+S-1) = 1/9
    # Generating from the run reads its checkpoint: the layers come in the model's order,
    # as the run's own end-of-run parameters do.
    generator = Generator.from_run(str(tmp_path / "cut"), console=Console(quiet=True))
    jax.tree.map(np.testing.assert_array_equal, generator.params, saved.params)
    quiet = Console(quiet=True)
    resumed = train_run(config.load(None, [*base, *plain, f"run.dir={tmp_path / 'cut'}"]), quiet)
    whole = train_run(config.load(None, [*base, *plain, f"run.dir={tmp_path / 'whole'}"]), quiet)
    assert resumed.start_step == 2
    losses = [loss_curve(r.metrics_path)[1][-1] for r in (resumed, whole)]
    np.testing.assert_allclose(*losses, rtol=F32)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["mesh.stage=4", "mesh.fsdp=2", "model.n_layers=6"], "model.n_layers"),
        (["mesh.stage=4", "mesh.fsdp=2", "mesh.pipeline_repeats=3"], "model.n_layers"),
        (["mesh.fsdp=8", "mesh.pipeline_repeats=2"], "mesh.pipeline_repeats"),
        (["mesh.stage=4", "mesh.fsdp=2", "train.microbatches=2"], "train.microbatches"),
        (["mesh.stage=2", "model.family=bert", "train.objective=mlm"], "mesh.stage"),
        (["mesh.stage=2", "mesh.fsdp=2", "mesh.sequence=2"], "mesh.sequence"),
        (["mesh.stage=2", "model.moe.num_experts=4"], "model.moe.num_experts"),
    ],
)
def test_bad_pipeline_config_names_its_key(overrides, key):
    cfg = config.load(None, [*PIPE, "train.microbatches=8", *overrides])
    with pytest.raises(UserError, match=f"^{re.escape(key)}"):
        cfg.check_devices(8)


def test_schedule_arithmetic():
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 28) == pytest.approx(3 / 31)
    assert bubble_fraction(4, 4, repeats=2) == pytest.approx(3 / 11)
    assert bubble_fraction(1, 8) == 0
    # Circular, 2 stages x 2 repeats of 2 layers: stage 0 holds layers 0-1 and 4-5.
    np.testing.assert_array_equal(layer_order(8, 2, 2), [0, 1, 4, 5, 2, 3, 6, 7])
    np.testing.assert_array_equal(layer_order(8, 4, 1), np.arange(8))
    assert permutation(8, (4, 1), (2, 1)) is None  # one repeat: the model's order
    stored = np.arange(8)[layer_order(8, 4, 2)]
    np.testing.assert_array_equal(stored[permutation(8, (4, 2), (2, 2))], layer_order(8, 2, 2))
    np.testing.assert_array_equal(stored[permutation(8, (4, 2), (1, 1))], np.arange(8))
    assert microbatch_count(32, 8, 4) == 8  # 4 rows each, one per device
    assert microbatch_count(32, 8, 8) == 4  # 8 rows each: the most that still split
    assert microbatch_count(6, 4, 1) == 3
    assert microbatch_count(7, 4, 1) == 1


def test_plan_reports_the_schedule():
    """`jaxtrain plan`'s figures for a pipelined step name its stages, microbatches and
    bubble; its memory is the compiled step's, with every microbatch's stage inputs."""
    _, program = pipelined("stage2_fsdp4")
    plan = make_plan(program)
    assert plan.to_json()["pipeline"] == {
        "stages": 2,
        "microbatches": 4,
        "repeats": 1,
        "bubble": 0.2,
    }
    assert plan.memory.temporaries > 0

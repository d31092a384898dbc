"""What a compiled train step needs per device: memory by category and collective traffic.

Memory comes from the state's shardings (parameters, optimizer state, the float32
gradients they imply) and from XLA's analysis of the compiled step (arguments, outputs,
temporaries: activations, logits, gradients and the accumulator). The peak is what
:func:`jaxtrain.train.loop.check_fits` compares with the device
(:func:`jaxtrain.train.loop.step_peak`). Traffic is counted in the optimized HLO
(:mod:`jaxtrain.plan.hlo`) and set against ZeRO's ideal for the same layout.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from jaxtrain.models.pipeline import bubble_fraction
from jaxtrain.plan.hlo import KINDS, Traffic, collective_traffic
from jaxtrain.plan.table import state_plan
from jaxtrain.sharding.batch_shards import per_shard_shardings, shard_count
from jaxtrain.sharding.grad_comm import WIRE_DTYPES
from jaxtrain.sharding.traffic import IdealTraffic, itemsize, zero_ideal
from jaxtrain.train.loop import step_peak
from jaxtrain.train.program import Program, accumulates_locally

HEADROOM = 0.9  # a plan fits when its peak is at most this share of the device's memory


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device."""

    parameters: int
    optimizer: int
    gradients: int
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    peak: int  # arguments + outputs + temporaries - aliased, less what is in host memory
    host: int = 0  # between steps in host memory (train.offload), not on the device
    params_on_host: bool = False  # train.offload=opt_state+params


@dataclasses.dataclass(frozen=True)
class Plan:
    """One compiled step: its layout, memory, traffic and the ideal traffic."""

    preset: str
    mesh: dict[str, int]
    devices: int
    platform: str
    microbatches: int
    accumulation: str  # where the gradient sum lives: "sharded" or "local"
    memory: Memory
    traffic: dict[str, Traffic]
    ideal: IdealTraffic
    compile_s: float
    experts: int = 0  # model.moe.num_experts: grouped matmuls, lowered densely on CPU
    grad_comm: str = "float32"  # train.grad_comm_dtype: what gradients cross devices in
    stages: int = 1  # pipeline stages (mesh.stage); the microbatches flow through them
    repeats: int = 1  # passes of every microbatch through the stages (mesh.pipeline_repeats)

    def fits(self, hbm: int) -> bool:
        return self.memory.peak <= HEADROOM * hbm

    @property
    def moved(self) -> int:
        """Collective bytes per device per step at the program's dtypes."""
        return sum(t.program_bytes for t in self.traffic.values())

    def to_json(self) -> dict[str, Any]:
        memory = dataclasses.asdict(self.memory)
        return {
            "preset": self.preset,
            "mesh": self.mesh,
            "devices": self.devices,
            "platform": self.platform,
            "microbatches": self.microbatches,
            "grad_accumulation": self.accumulation,
            "grad_comm_dtype": self.grad_comm,
            "compile_seconds": round(self.compile_s, 1),
            "memory_bytes_per_device": memory,
            "collectives_per_device_per_step": {
                kind: dataclasses.asdict(t) for kind, t in self.traffic.items()
            },
            "zero_ideal_bytes": dataclasses.asdict(self.ideal) | {"total": self.ideal.total},
            "moved_bytes": self.moved,
        } | ({"pipeline": self.pipeline()} if self.stages > 1 else {})

    def pipeline(self) -> dict[str, Any]:
        """The pipeline's schedule: stages, microbatches, repeats (circular) and the
        bubble's share."""
        bubble = bubble_fraction(self.stages, self.microbatches, self.repeats)
        return {
            "stages": self.stages,
            "microbatches": self.microbatches,
            "repeats": self.repeats,
            "bubble": bubble,
        }


def _f32_gradient_bytes(program: Program) -> int:
    """Per-device bytes of the float32 gradient sum: laid out like the parameters, or,
    accumulated locally, one batch shard's whole sum per device."""
    shapes = [leaf.shape for leaf in jax.tree.leaves(program.abstract_state.params)]
    shardings = program.state_shardings.params
    if accumulates_locally(program.config, program.batch_sharding):
        shards = shard_count(program.batch_sharding)
        shapes = [(shards, *shape) for shape in shapes]
        shardings = per_shard_shardings(shardings, program.batch_sharding)
    total = 0
    for shape, sharding in zip(shapes, jax.tree.leaves(shardings), strict=True):
        total += int(np.prod(sharding.shard_shape(shape))) * 4
    return total


def make_plan(program: Program) -> Plan:
    """Compile ``program``'s train step (allocating nothing) and measure it."""
    start = time.perf_counter()
    compiled = program.train_step.lower(program.abstract_state, program.abstract_batch()).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    params, opt = state_plan(program)
    optimizer = sum(r.bytes_per_device for r in opt)
    parameters = sum(r.bytes_per_device for r in params)
    offload = program.config.train.offload
    host = (optimizer if offload != "none" else 0) + (
        parameters if program.config.train.offloads_params else 0
    )
    # XLA:CPU has one memory and counts host arguments (passed in, returned, donated) with
    # the rest; on GPU/TPU its analysis keeps them apart (host_argument_size_in_bytes).
    lumped = host if not stats.host_argument_size_in_bytes else 0
    memory = Memory(
        parameters=parameters,
        optimizer=optimizer,
        gradients=_f32_gradient_bytes(program),
        arguments=stats.argument_size_in_bytes,
        outputs=stats.output_size_in_bytes,
        aliased=stats.alias_size_in_bytes,
        temporaries=stats.temp_size_in_bytes,
        peak=step_peak(stats) - lumped,
        host=host,
        params_on_host=program.config.train.offloads_params,
    )
    cfg = program.config
    ideal = zero_ideal(
        program.abstract_state.params,
        program.state_shardings.params,
        gather_itemsize=itemsize(cfg.model.compute_dtype),
        reduce_itemsize=itemsize(WIRE_DTYPES.get(cfg.train.grad_comm_dtype, "float32")),
    )
    traffic = collective_traffic(compiled.as_text())
    devices = program.mesh.devices.flat
    first = next(iter(devices))
    return Plan(
        preset=cfg.mesh.preset,
        mesh={k: int(v) for k, v in program.mesh.shape.items()},
        devices=int(program.mesh.devices.size),
        platform=first.platform,
        microbatches=program.pipeline_schedule()[1],
        accumulation="local" if accumulates_locally(cfg, program.batch_sharding) else "sharded",
        memory=memory,
        traffic={k: traffic[k] for k in KINDS},
        ideal=ideal,
        compile_s=compile_s,
        experts=cfg.model.moe.num_experts,
        grad_comm=cfg.train.grad_comm_dtype,
        stages=program.spec.stages,
        repeats=program.spec.repeats,
    )

"""Assemble the compiled training program for a config on a mesh.

One call gives everything the host loop (and the tests) need: the model's parameter
layout, the optimizer, the abstract state with its shardings, and the train and eval
steps jitted once with explicit in/out shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding

from jaxtrain.config import Config
from jaxtrain.data import Loader, Objective, TokenDataset
from jaxtrain.models.pipeline import microbatch_count
from jaxtrain.sharding import Rules, partition_spec, preset
from jaxtrain.sharding.batch_shards import (
    batch_axes,
    per_shard_shardings,
    shard_count,
)
from jaxtrain.train.layer_order import (
    MODEL_ORDER,
    reorder_opt_state,
    reorder_params,
    saved_layout,
)
from jaxtrain.train.optim import make_optimizer
from jaxtrain.train.state import ModelSpec, TrainState, create_state, model_spec, state_shardings
from jaxtrain.train.step import LocalAccumulation, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Program:
    """A config compiled onto a mesh (steps are jitted; call :meth:`compile` to lower)."""

    config: Config
    mesh: Mesh
    rules: Rules
    spec: ModelSpec
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable

    def init_state(self) -> TrainState:
        """A fresh state, created directly in its shardings; its parameters are read from
        the Hugging Face checkpoint of ``model.init_from`` when that is set."""
        params = None
        if self.config.model.init_from:
            from jaxtrain.models.hf import load_params

            path = self.config.model.init_from.removeprefix("hf:")
            spec = self.spec
            params = load_params(
                path, self.config.model, spec.abstract_params, spec.param_shardings
            )
        return create_state(self.config, self.tx, self.spec, self.state_shardings, params)

    def device_params(self, params: Any) -> Any:
        """``params`` on the devices: copied there from host memory when the config
        offloads them (``train.offload=opt_state+params``), else as they are."""
        if not self.config.train.offloads_params:
            return params
        return jax.device_put(params, self.spec.param_shardings)

    def model_params(self, params: Any) -> Any:
        """This program's ``params`` in the model's own order of the stacked layers (what
        exports, samples and the run's ``params`` directory hold): the same arrays unless
        a circular pipeline stores them stage by stage."""
        layout, logical = self.spec.layout(), self.spec.logical
        if layout[1] == 1:
            return params
        move = jax.jit(
            lambda p: reorder_params(p, logical, layout, MODEL_ORDER),
            out_shardings=self.spec.param_shardings,
        )
        return move(params)

    def adopt(self, state: TrainState, meta: dict) -> TrainState:
        """A state restored from a checkpoint whose JSON record is ``meta``, in this
        program's order of the stacked layers (the checkpoint's may be another pipeline
        schedule's; the state is donated)."""
        src, dst, logical = saved_layout(meta), self.spec.layout(), self.spec.logical
        if src[1] == dst[1] == 1:  # both in the model's order
            return state

        def move(state: TrainState) -> TrainState:
            return state.replace(
                params=reorder_params(state.params, logical, src, dst),
                opt_state=reorder_opt_state(state.opt_state, logical, src, dst),
            )

        return jax.jit(move, out_shardings=self.state_shardings, donate_argnums=0)(state)

    def pipeline_schedule(self) -> tuple[int, int]:
        """(stages, microbatches): the step's microbatches and the pipeline stages they
        flow through. Pipelined, ``train.microbatches`` or fewer where a train batch's
        rows do not split into that many equal parts for its devices
        (:func:`jaxtrain.models.pipeline.microbatch_count`); unpipelined, one stage and
        ``train.microbatches``."""
        rows, wanted = self.config.train.global_batch, self.config.train.microbatches
        if self.spec.stages == 1:
            return 1, wanted
        return self.spec.stages, microbatch_count(rows, wanted, shard_count(self.batch_sharding))

    def abstract_batch(self, rows: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        cfg = self.config
        layout = Objective.from_config(cfg).layout(cfg.data.seq_len, cfg.data.packing)
        return {
            key: jax.ShapeDtypeStruct(
                (rows or cfg.train.global_batch, length), dtype, sharding=self.batch_sharding
            )
            for key, (length, dtype) in layout.items()
        }

    def loader(self, dataset: TokenDataset) -> Loader:
        """The batch loader for ``dataset``: this config's seed, batch and length, batches
        laid out in this program's batch sharding, made for the config's objective.

        Raises:
            UserError: if the objective's special token ids collide with the data's EOS.
        """
        cfg = self.config
        objective = Objective.from_config(cfg)
        objective.check(dataset.eos_id, cfg.data.seq_len)
        return Loader(
            dataset,
            seed=cfg.train.seed,
            global_batch=cfg.train.global_batch,
            seq_len=cfg.data.seq_len,
            sharding=self.batch_sharding,
            packing=cfg.data.packing,
            objective=objective,
        )

    def compile(self) -> tuple[Any, float]:
        """Lower and compile the train step before step 1; return (compiled, seconds)."""
        start = time.perf_counter()
        compiled = self.train_step.lower(self.abstract_state, self.abstract_batch()).compile()
        return compiled, time.perf_counter() - start


def accumulates_locally(config: Config, batch: NamedSharding) -> bool:
    """Whether the step keeps each batch shard's gradient sum on its devices
    (``train.grad_accumulation=local`` with several batch shards, and several microbatches
    or a narrow ``train.grad_comm_dtype`` for the one reduction)."""
    train = config.train
    reason = train.microbatches > 1 or train.grad_comm_dtype != "float32"
    return train.grad_accumulation == "local" and reason and shard_count(batch) > 1


def local_accumulation(
    config: Config, mesh: Mesh, rules: Rules, spec: ModelSpec, batch: NamedSharding
) -> LocalAccumulation | None:
    """What the step needs to accumulate locally, or None when it does not."""
    if not accumulates_locally(config, batch):
        return None
    return LocalAccumulation(
        spec=model_spec(config, mesh, rules.within_batch_shard()),
        shards=shard_count(batch),
        axes=batch_axes(batch),
        shardings=per_shard_shardings(spec.param_shardings, batch),
    )


def build_program(config: Config, mesh: Mesh) -> Program:
    """Resolve shardings and jit the steps of ``config`` on ``mesh`` (allocates nothing)."""
    rules = preset(config.mesh.preset)
    spec = model_spec(config, mesh, rules)
    tx, lr = make_optimizer(config.optim, config.train.steps, spec.logical)
    abstract, shardings = state_shardings(config, spec, tx, mesh, rules)
    batch_spec = partition_spec(
        ("batch", "length"),
        (config.train.global_batch, config.data.seq_len),
        mesh,
        rules,
        where="batch",
    )
    batch_sharding = NamedSharding(mesh, batch_spec)
    layout = Objective.from_config(config).layout(config.data.seq_len, config.data.packing)
    batch_shardings = {key: batch_sharding for key in layout}
    # The loss forms the logits a chunk at a time (train.loss_chunk_tokens per device),
    # keeping one copy of the head's gradient per device the batch's rows are split over
    # (after a pipeline, over its stages too).
    chunking = {
        "loss_chunk_tokens": config.train.loss_chunk_tokens,
        "row_shards": shard_count(batch_sharding) * spec.stages,
    }
    offload_params = spec.param_shardings if config.train.offloads_params else None
    step = make_train_step(
        spec,
        tx,
        lr,
        # A pipelined model splits the batch into the microbatches itself.
        microbatches=1 if spec.stages > 1 else config.train.microbatches,
        skip_nonfinite=config.train.on_nonfinite == "skip",
        local=local_accumulation(config, mesh, rules, spec, batch_sharding),
        scaling=config.train.loss_scale if config.loss_scaling() else None,
        offload=shardings.opt_state if config.train.offload != "none" else None,
        offload_params=offload_params,
        grad_comm=config.train.grad_comm_dtype,
        **chunking,
    )
    train_step = jax.jit(
        step,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(spec, offload_params=offload_params, **chunking),
        in_shardings=(shardings.params, batch_shardings),
    )
    return Program(
        config,
        mesh,
        rules,
        spec,
        tx,
        lr,
        abstract,
        shardings,
        batch_sharding,
        train_step,
        eval_step,
    )

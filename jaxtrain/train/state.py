"""The train state and how it is born sharded.

``jax.eval_shape`` gives the abstract model; the rules table turns its logical axes into
NamedShardings; ``jax.jit(init, out_shardings=...)`` then creates every array directly
in its shards, so no full copy of the parameters ever exists on one device. The same
abstract tree (shapes, dtypes, shardings) is the target for a checkpoint restore.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtrain import models
from jaxtrain.config import Config, MoEConfig
from jaxtrain.sharding import (
    ActivationSharding,
    Rules,
    opt_state_shardings,
    param_logical_axes,
    tree_shardings,
)
from jaxtrain.sharding.context import sequence_ways
from jaxtrain.train import loss_scale
from jaxtrain.train.layer_order import MODEL_ORDER, Layout, reorder_params
from jaxtrain.train.offload import HOST, in_memory


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree and nothing else."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array  # updates dropped for a non-finite loss or gradient (train.on_nonfinite)
    # Dynamic loss scaling (float16 compute); None, an empty subtree, when it is off.
    loss_scale: loss_scale.LossScale | None = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model reduced to what the pure step needs: its graph and its parameter layout."""

    graphdef: Any
    abstract_params: Any
    logical: Any
    param_shardings: Any
    sequence_ways: int = 1  # context parallelism: batches are laid out zigzag
    moe: MoEConfig | None = None  # experts: the model reports router statistics
    stages: int = 1  # pipeline parallelism: the model splits batches into microbatches
    repeats: int = 1  # a circular pipeline: its stacked layers are stored stage by stage

    def layout(self) -> Layout:
        """The stored order of the stacked layers (:mod:`jaxtrain.train.layer_order`)."""
        return self.stages, self.repeats

    def apply(self, params: Any, tokens: jax.Array, **kwargs: Any) -> jax.Array:
        """Run the model on a pure-dict ``params`` tree."""
        return nnx.merge(self.graphdef, params)(tokens, **kwargs)


def model_spec(cfg: Config, mesh: Mesh | None, rules: Rules | None) -> ModelSpec:
    """Build the model abstractly (no memory) and resolve its parameter shardings. When
    the rules split the layers over pipeline stages, the model pipelines each batch in
    ``train.microbatches`` microbatches (:mod:`jaxtrain.models.pipeline`)."""
    shard = models.no_shard
    if mesh is not None:
        shard = ActivationSharding(mesh, rules)
        if shard.pipeline_stages() > 1:
            micro, repeats = cfg.train.microbatches, cfg.mesh.pipeline_repeats
            shard = ActivationSharding(mesh, rules, micro, repeats)
    abstract = nnx.eval_shape(lambda: models.build(cfg.model, rngs=nnx.Rngs(0), shard=shard))
    graphdef, state = nnx.split(abstract, nnx.Param)
    logical = param_logical_axes(state)
    abstract_params = nnx.to_pure_dict(state)
    shardings = None if mesh is None else tree_shardings(abstract_params, logical, mesh, rules)
    moe = cfg.model.moe if cfg.model.moe.num_experts else None
    stages = shard.pipeline_stages() if isinstance(shard, ActivationSharding) else 1
    repeats = cfg.mesh.pipeline_repeats if stages > 1 else 1
    return ModelSpec(
        graphdef,
        abstract_params,
        logical,
        shardings,
        sequence_ways(mesh, rules),
        moe,
        stages,
        repeats,
    )


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, train key): two independent streams from the one root seed.

    nnx draws parameter keys as ``fold_in(init, i)`` and stacked layers from
    ``split(fold_in(init, i), n)``; the step's key is ``fold_in(train, step)``. Were the
    train key any key of the init tree (as ``fold_in(root, 1)`` once was: the stacked
    layers' key), step ``s`` would draw dropout masks from layer ``s``'s init keys. Two
    children of the root keep the trees disjoint.
    """
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, train_key


def _init_fn(cfg: Config, tx: optax.GradientTransformation, spec: ModelSpec) -> Callable:
    def init(params: Any = None) -> TrainState:
        init_key, train_key = seed_keys(cfg.train.seed)
        if params is None:  # fresh random parameters (else: given, e.g. imported)
            model = models.build(cfg.model, rngs=nnx.Rngs(params=init_key))
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        # Stored in the program's order of the stacked layers (a circular pipeline's).
        params = reorder_params(params, spec.logical, MODEL_ORDER, spec.layout())
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=train_key,
            skipped=jnp.zeros((), jnp.int32),
            loss_scale=loss_scale.initial(cfg.train.loss_scale) if cfg.loss_scaling() else None,
        )

    return init


def state_shardings(
    cfg: Config, spec: ModelSpec, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules
) -> tuple[TrainState, TrainState]:
    """(abstract state, its NamedShardings), without allocating anything."""
    abstract = jax.eval_shape(_init_fn(cfg, tx, spec))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = opt_state_shardings(abstract.opt_state, spec.logical, mesh, rules)
    params = spec.param_shardings
    if cfg.train.offload != "none":
        opt_state = in_memory(opt_state, HOST)
    if cfg.train.offloads_params:
        params = in_memory(params, HOST)
    shardings = TrainState(
        step=replicated,
        params=params,
        opt_state=opt_state,
        rng=replicated,
        skipped=replicated,
        loss_scale=jax.tree.map(lambda _: replicated, abstract.loss_scale),
    )
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return abstract, shardings


def create_state(
    cfg: Config,
    tx: optax.GradientTransformation,
    spec: ModelSpec,
    shardings: TrainState,
    params: Any = None,
) -> TrainState:
    """Initialise the train state of ``spec``'s model directly into ``shardings``: random
    parameters, or ``params`` (in the model's layer order and already in their
    shardings; donated) with a fresh optimizer state."""
    if params is None:
        return jax.jit(_init_fn(cfg, tx, spec), out_shardings=shardings)()
    init = jax.jit(_init_fn(cfg, tx, spec), out_shardings=shardings, donate_argnums=0)
    return init(params)

"""Train state, the pure step, the optimizer, the compiled program and the host loop."""

from jaxtrain.train.loss import chunked_cross_entropy_sum, cross_entropy_sum
from jaxtrain.train.program import Program, build_program
from jaxtrain.train.state import ModelSpec, TrainState, model_spec
from jaxtrain.train.step import make_eval_step, make_train_step

__all__ = [
    "ModelSpec",
    "Program",
    "TrainState",
    "build_program",
    "chunked_cross_entropy_sum",
    "cross_entropy_sum",
    "make_eval_step",
    "make_train_step",
    "model_spec",
]

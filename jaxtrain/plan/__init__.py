"""``jaxtrain plan``: what a config's compiled step needs per device, before any run."""

from jaxtrain.plan.table import print_plan, state_plan

__all__ = ["print_plan", "state_plan"]

"""Every shipped config loads, validates, builds abstractly and resolves its shardings
on the 8-device CPU mesh."""

from pathlib import Path

import pytest

from jaxtrain import config
from jaxtrain.metrics import count_params
from jaxtrain.plan import state_plan
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "llama3-8b.yaml", "llama3-1b.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_resolves_on_8_devices(path):
    cfg = config.load(str(path))
    program = build_program(cfg, make_mesh(cfg))
    assert program.mesh.devices.size == 8
    params, opt_state = state_plan(program)
    # Every shipped config shards its state (ZeRO-3, or ZeRO-3 x tensor) over 8 devices.
    for rows in (params, opt_state):
        total = sum(r.bytes_total for r in rows)
        per_device = sum(r.bytes_per_device for r in rows)
        assert per_device < total / 4


def test_llama3_8b_has_8b_parameters():
    cfg = config.load(str(next(p for p in CONFIGS if p.name == "llama3-8b.yaml")))
    program = build_program(cfg, make_mesh(cfg))
    assert 8.0e9 < count_params(program.spec.abstract_params) < 8.1e9

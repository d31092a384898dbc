"""Every shipped config loads, validates, builds abstractly and resolves its shardings
on the 8-device CPU mesh, names its target hardware and fits it (`jaxtrain plan`)."""

import json
from pathlib import Path

import pytest

from jaxtrain import cli, config
from jaxtrain.metrics import active_params, count_params
from jaxtrain.plan import state_plan
from jaxtrain.sharding import make_mesh
from jaxtrain.train import build_program

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {
        "tiny.yaml",
        "llama3-8b.yaml",
        "llama3-1b.yaml",
        "mixtral-8x7b.yaml",
    }


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


def test_mixtral_8x7b_has_47b_parameters_13b_active():
    cfg = config.load(str(next(p for p in CONFIGS if p.name == "mixtral-8x7b.yaml")))
    program = build_program(cfg, make_mesh(cfg))
    total = count_params(program.spec.abstract_params)
    assert 46.6e9 < total < 46.8e9
    assert 12.8e9 < active_params(cfg.model, total) < 13.0e9


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_names_its_target(path):
    target = config.load(str(path)).target
    if path.name == "tiny.yaml":  # the default: this machine
        assert target == config.TargetConfig()
    else:
        assert target.device and target.devices > 0 and target.hbm_gib > 0


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_fits_its_target(path, capfd):
    """The real step compiled for the target's device count fits its memory (with 10%
    headroom), as `jaxtrain plan CONFIG` reports it: run in this process, whose 8
    simulated devices are most targets' count (the command re-runs itself in a
    subprocess for another count), so no config pays a second interpreter's start."""
    status = cli.main(["plan", str(path), "--json"])
    out, err = capfd.readouterr()
    assert status == 0, err[-3000:]
    plan = json.loads(out)
    target = config.load(str(path)).target
    assert plan["devices"] == (target.devices or 8)
    assert plan["fits"] is True, plan["memory_bytes_per_device"]

"""Config loading, overrides and validation: every refusal names its key."""

from pathlib import Path

import pytest

from jaxtrain import config
from jaxtrain.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_configs_tiny_yaml():
    assert config.load(str(ROOT / "configs" / "tiny.yaml")) == config.Config()


def test_overrides_parse_types_and_round_trip(tmp_path):
    cfg = config.load(
        None,
        [
            "mesh.fsdp=4",
            "train.steps=20",
            "model.n_layers=2",
            "run.dir=/tmp/x",
            "optim.lr=1e-3",
            "model.tie_embeddings=true",
        ],
    )
    assert (cfg.mesh.fsdp, cfg.train.steps, cfg.model.n_layers) == (4, 20, 2)
    assert cfg.run.dir == "/tmp/x" and cfg.optim.lr == 1e-3 and cfg.model.tie_embeddings
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert config.load(str(path)) == cfg


def test_mesh_fill_axis():
    assert config.MeshConfig(data=2, fsdp=-1).resolve(8) == {
        "data": 2, "stage": 1, "fsdp": 4, "expert": 1, "sequence": 1, "tensor": 1
    }  # fmt: skip
    assert config.MeshConfig(sequence=2).resolve(8)["fsdp"] == 4


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.foo=1"], "model.foo"),
        (["bogus.x=1"], "bogus"),
        (["train.steps=abc"], "train.steps"),
        (["train.steps=1.5"], "train.steps"),
        (["model.tie_embeddings=3"], "model.tie_embeddings"),
        (["model.n_heads=5"], "model.n_heads"),
        (["model.n_kv_heads=3"], "model.n_kv_heads"),
        (["model.remat=some"], "model.remat"),
        (["mesh.preset=zero9"], "mesh.preset"),
        (["mesh.tensor=2"], "mesh.tensor"),
        (["mesh.data=-1"], "mesh"),
        (["data.seq_len=4096"], "data.seq_len"),
        (["train.microbatches=3"], "train.microbatches"),
        (["train.steps"], "--set train.steps"),
        (["train.on_nonfinite=ignore"], "train.on_nonfinite"),
        (["train.grad_accumulation=replicated"], "train.grad_accumulation"),
        (["mesh.dcn_data=0"], "mesh.dcn_data"),
        (["model.norm_eps=-1e-5"], "model.norm_eps"),
        (["model.family=gpt9"], "model.family"),
        (["train.seed=-1"], "train.seed"),
        (["model.compute_dtype=float16", "train.loss_scale.kind=none"], "train.loss_scale.kind"),
        (["model.param_dtype=float16"], "model.param_dtype"),
        (["train.loss_scale.factor=1"], "train.loss_scale.factor"),
        (["train.loss_scale.min=1e9"], "train.loss_scale.min"),
        (["optim.lr=.inf"], "optim.lr"),
        (["train.profile=5-3"], "train.profile"),
        (["train.profile=steps"], "train.profile"),
        (["train.profile=100-200"], "train.profile"),  # past train.steps
        (["sample.max_new_tokens=-1"], "sample.max_new_tokens"),
        (["sample.temperature=-0.5"], "sample.temperature"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(UserError) as err:
        config.load(None, overrides)
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message


@pytest.mark.parametrize(
    "overrides, n_devices, key",
    [
        (["mesh.fsdp=3"], 8, "mesh"),
        (["mesh.data=3", "mesh.fsdp=-1"], 8, "mesh.fsdp"),
        (["mesh.preset=fsdp_tp", "mesh.tensor=4", "mesh.fsdp=-1"], 8, "model.n_kv_heads"),
        (["train.global_batch=12"], 8, "train.global_batch"),
        (["train.global_batch=16", "train.microbatches=4"], 8, "train.global_batch"),
        (["mesh.data=2", "mesh.fsdp=4", "mesh.dcn_data=4"], 8, "mesh.dcn_data"),
    ],
)
def test_device_dependent_checks(overrides, n_devices, key):
    cfg = config.load(None, overrides)
    with pytest.raises(UserError) as err:
        cfg.check_devices(n_devices)
    assert str(err.value).startswith(key)


def test_device_count_errors_speak_of_processes_and_local_devices():
    cfg = config.load(None, ["mesh.fsdp=16"])
    with pytest.raises(UserError, match=r"there are 8 devices \(2 processes x 4 local devices\)"):
        cfg.check_devices(8, n_processes=2)
    hybrid = config.load(None, ["mesh.data=4", "mesh.fsdp=2", "mesh.dcn_data=4"])
    with pytest.raises(UserError, match=r"^mesh.dcn_data: .* 4 host groups.*2 processes x 4"):
        hybrid.check_devices(8, n_processes=2)
    sizes = {"data": 4, "stage": 1, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 1}
    assert hybrid.check_devices(8, n_processes=4) == sizes


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        config.load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(UserError, match="mapping"):
        config.load(str(scalar))

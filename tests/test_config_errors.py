"""Config files, ``--set`` values and environment variables that once ended in a
traceback, a silent wrong run or a many-line message: each is now one short line that
names the key, file or variable. Config-level cases call :func:`config.load`; the CLI
table runs the real ``jaxtrain`` executable."""

import dataclasses
import os
import shutil
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import pytest
from helpers.cli import jaxtrain

from jaxtrain import config, config_file
from jaxtrain.env import env_float, env_int
from jaxtrain.errors import UserError, one_line, quote

ROOT = Path(__file__).resolve().parents[1]
SHORT = 200  # what "one short line" means for a config message here


def refusal(path=None, overrides=()) -> str:
    with pytest.raises(UserError) as err:
        config.load(path, overrides)
    message = str(err.value)
    assert "\n" not in message and len(message) <= SHORT, message
    return message


def leaf_fields(cls=config.Config, prefix=""):
    """Every (dotted key, type) of the schema, nested sections included."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint, key = hints[field.name], f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hint):
            yield from leaf_fields(hint, f"{key}.")
        else:
            yield key, hint


INT_KEYS = [k for k, t in leaf_fields() if t is int]
FLOAT_KEYS = [k for k, t in leaf_fields() if t is float]


# --- values ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("value", ["2147483648", "-2147483649", str(10**40)])
def test_every_int_key_must_fit_32_bits(key, value):
    assert refusal(None, [f"{key}={value}"]).startswith(f"{key}: ")


@pytest.mark.parametrize(
    "item",
    ["model.d_model=" + str(10**30), "train.steps=" + str(10**40), f"model.vocab_size={2**62}"],
)
def test_huge_sizes_name_the_key_and_the_bound(item):
    key = item.split("=")[0]
    assert refusal(None, [item]) == f"{key}: {item.split('=')[1]} is out of range: integers " + (
        "must fit in 32 bits (below 2**31)"
    )


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400", "1" + "0" * 400, "nan"])
def test_every_float_key_must_be_finite(key, value):
    message = refusal(None, [f"{key}={value}"])
    assert message.startswith(f"{key}: must be a finite number"), message


@pytest.mark.parametrize("seed", [-1, 2**31, 2**32, 2**62, 2**64])
def test_seed_range(seed):
    assert refusal(None, [f"train.seed={seed}"]).startswith("train.seed: ")


def test_seed_bounds_are_accepted():
    for seed in (0, 2**31 - 1):
        assert config.load(None, [f"train.seed={seed}"]).train.seed == seed


def test_float16_computes_only_with_loss_scaling():
    """float16 compute scales the loss by default and refuses to go without; float16
    master weights are refused outright."""
    assert refusal(None, ["model.compute_dtype=float16", "train.loss_scale.kind=none"]) == (
        "train.loss_scale.kind: none with model.compute_dtype=float16 lets small gradients "
        "underflow to zero; use auto or dynamic (or compute in bfloat16)"
    )
    assert refusal(None, ["model.param_dtype=float16"]).startswith(
        "model.param_dtype: float16 master weights lose every update"
    )
    assert config.load(None, ["model.compute_dtype=float16"]).loss_scaling()
    assert not config.load(None, ["model.compute_dtype=bfloat16"]).loss_scaling()
    assert config.load(None, ["train.loss_scale.kind=dynamic"]).loss_scaling()


@pytest.mark.parametrize(
    "item, key",
    [
        ("run.dir=a\0b", "run.dir"),
        ("data.path=\udcff", "data.path"),  # an undecodable byte from the command line
        ("data.tokenizer=\udcfftok", "data.tokenizer"),
    ],
)
def test_strings_a_path_cannot_hold(item, key):
    assert refusal(None, [item]).startswith(f"{key}: ")


# --- messages stay one short line -----------------------------------------------------

LONG = "x" * 10_000


@pytest.mark.parametrize(
    "item",
    [
        f"model.family={LONG}",
        f"model.remat={LONG}",
        f"model.init_from={LONG}",
        f"train.steps={LONG}",
        f"train.steps={'9' * 10_000}",  # beyond int()'s 4300 digits
        f"optim.lr={LONG}",
        f"model.{LONG}=1",
        f"{LONG}=1",
        f"model.d_model.{LONG}=1",
        LONG,  # no '='
        "model.family=a\nb\nc",
        "train.steps=[1,\n2]",
        "model.init_from=x\n" * 500,
        f"run.dir={'a/' * 5000}\0",
        f"model=[{LONG}]",
    ],
)
def test_messages_stay_short_whatever_the_input(item):
    refusal(None, [item])


def test_quote_bounds_text_and_cost():
    nested: list = []
    nested.append(nested)  # a recursive list
    deep: list = [1]
    for _ in range(10_000):
        deep = [deep]
    for value in (LONG, "a\nb" * 1000, 10**10_000, nested, deep, {"k": LONG}, "\udcff" * 99):
        text = quote(value)
        assert len(text) <= 60 and text.isprintable(), text
    assert quote("plain") == "plain" and quote("a\nb") == "'a\\nb'"


def test_one_line_is_the_first_line_cut_short():
    assert one_line("first\nsecond") == "first ..."
    assert len(one_line("y" * 10_000)) == 400


# --- files ----------------------------------------------------------------------------


def test_not_utf8(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train:\n  steps: 3\nrun:\n  dir: caf\xe9\n".encode("latin-1"))
    assert refusal(str(bad)) == f"config file {bad}: not UTF-8 text (byte 0xe9 on line 4)"


def test_utf8_with_bom_loads(tmp_path):
    file = tmp_path / "bom.yaml"
    file.write_bytes(b"\xef\xbb\xbftrain:\n  steps: 3\n")
    assert config.load(str(file)).train.steps == 3


def test_directory_and_special_files(tmp_path):
    assert refusal(str(tmp_path)) == f"config file {tmp_path} is a directory; give a YAML file"
    assert "is not a regular file" in refusal("/dev/null")
    assert "File name too long" in refusal("a" * 5000 + ".yaml")
    file = tmp_path / "f.yaml"
    file.write_text("{}\n")
    assert "cannot read it (Not a directory)" in refusal(str(file / "under.yaml"))
    big = tmp_path / "big.yaml"
    big.write_text("# pad\n" * 300_000)
    assert "MiB; a config is a small YAML file" in refusal(str(big))


def test_duplicate_keys(tmp_path):
    file = tmp_path / "dup.yaml"
    file.write_text("model:\n  d_model: 64\n  n_layers: 2\n  d_model: 32\n")
    assert refusal(str(file)) == (
        f"config file {file}: duplicate key d_model (line 4); give each key once"
    )
    file.write_text("train: {steps: 3}\nmodel: {}\ntrain: {steps: 4}\n")
    assert (
        refusal(str(file))
        == f"config file {file}: duplicate key train (line 3); give each key once"
    )
    # A merge key's values may be overridden: that is what merges are for.
    merged = config_file.parse_yaml(
        "m: &b {d_model: 64, n_layers: 2}\nmodel: {<<: *b, d_model: 32}"
    )
    assert merged["model"] == {"d_model": 32, "n_layers": 2}
    assert refusal(None, ["model={d_model: 1, d_model: 2}"]).startswith("--set model=")


def test_empty_file_uses_defaults_and_says_so(tmp_path, capsys):
    file = tmp_path / "empty.yaml"
    file.write_text("# nothing yet\n")
    assert config.load(str(file)) == config.Config()
    assert capsys.readouterr().err == (
        f"jaxtrain: note: config file {file} is empty; using the defaults\n"
    )


@pytest.mark.parametrize(
    "text, why",
    [
        ("train:\n  steps: " + "9" * 5000 + "\n", "Exceeds the limit"),  # int() refuses
        ("run:\n  dir: 2024-13-45\n", "month must be in 1..12"),  # a date that is none
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ("model: !!python/object:os.system {}\n", "line 1"),
    ],
)
def test_yaml_that_python_cannot_build(tmp_path, text, why):
    file = tmp_path / "c.yaml"
    file.write_text(text)
    message = refusal(str(file))
    assert message.startswith(f"config file {file}: not valid YAML") and why in message


def test_unknown_key_suggests_the_close_one():
    assert refusal(None, ["model.n_layerz=2"]) == (
        "model.n_layerz: unknown key (did you mean model.n_layers?)"
    )
    assert refusal(None, ["train.zzz=2"]).startswith("train.zzz: unknown key (known: steps, ")


# --- shipped configs ------------------------------------------------------------------


def test_shipped_configs_by_name():
    names = config_file.shipped_configs()
    assert {"tiny", "llama3-8b", "llama3-1b", "qwen3-1.7b"} <= set(names)
    assert config.load("tiny") == config.load(str(ROOT / "configs" / "tiny.yaml"))
    assert config.load("llama3-8b.yaml") == config.load(str(ROOT / "configs" / "llama3-8b.yaml"))
    assert config.load("qwen3-1.7b").model.qk_norm
    message = refusal("tinyy")
    assert message == (
        "config file tinyy does not exist, nor is it a shipped config "
        f"(shipped: {', '.join(names)})"
    )
    # A path (it has a separator) is only ever a path.
    assert refusal("nope/tiny.yaml") == (
        "config file nope/tiny.yaml does not exist (the shipped one is tiny)"
    )
    assert refusal("nope/other.yaml") == "config file nope/other.yaml does not exist"


def test_configs_folder_is_the_package_one():
    assert (ROOT / "configs").resolve() == (ROOT / "jaxtrain" / "configs").resolve()


def test_a_local_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    (tmp_path / "tiny").write_text("train:\n  steps: 7\n")
    monkeypatch.chdir(tmp_path)
    assert config.load("tiny").train.steps == 7


def test_wheel_ships_the_configs(tmp_path):
    """``pip install .`` must carry configs/*.yaml inside the package: build a wheel of
    the package, then load a config by name from the unpacked wheel alone."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    shutil.copytree(
        ROOT / "jaxtrain", src / "jaxtrain", ignore=shutil.ignore_patterns("__pycache__")
    )
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path / "dist"), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("jaxtrain-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("jaxtrain/configs/")}
    expected = {
        f"jaxtrain/configs/{p.name}" for p in (ROOT / "jaxtrain" / "configs").glob("*.yaml")
    }
    assert shipped == expected and "jaxtrain/configs/llama3-8b.yaml" in shipped
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = (
        "from jaxtrain import config, config_file; "
        "print(config_file.__file__); print(config.load('llama3-8b').model.d_model)"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    where, d_model = run.stdout.split()
    assert where.startswith(str(tmp_path / "site")) and d_model == "4096"


# --- environment variables ------------------------------------------------------------


def test_env_parsers_name_the_variable(monkeypatch):
    monkeypatch.setenv("JT_N", "two")
    with pytest.raises(UserError, match=r"^JT_N: expected an integer, got two$"):
        env_int("JT_N")
    monkeypatch.setenv("JT_N", "9" * 5000)
    with pytest.raises(UserError, match=r"^JT_N: expected an integer"):
        env_int("JT_N")
    monkeypatch.setenv("JT_N", "-1")
    with pytest.raises(UserError, match=r"^JT_N: -1 must be >= 0$"):
        env_int("JT_N", minimum=0)
    monkeypatch.setenv("JT_N", " 3 ")
    assert env_int("JT_N") == 3
    monkeypatch.setenv("JT_N", "")
    assert env_int("JT_N", 5) == 5
    for bad in ("abc", "inf", "nan", "1e400"):
        monkeypatch.setenv("JT_D", bad)
        with pytest.raises(UserError, match=r"^JT_D: expected a finite number"):
            env_float("JT_D", 0.0)
    monkeypatch.setenv("JT_D", "-0.5")
    with pytest.raises(UserError, match=r"^JT_D: -0.5 must be >= 0$"):
        env_float("JT_D", 0.0, minimum=0.0)
    monkeypatch.setenv("JT_D", "0.25")
    assert env_float("JT_D", 0.0, minimum=0.0) == 0.25


# --- the CLI: one line on stderr, no traceback ------------------------------------------


def files(tmp: Path) -> dict[str, Path]:
    made = {
        "latin1.yaml": "run:\n  dir: caf\xe9\n".encode("latin-1"),
        "dup.yaml": b"model:\n  d_model: 64\n  d_model: 32\n",
        "nul.yaml": b'run:\n  dir: "a\\0b"\n',
        "empty.yaml": b"",
    }
    for name, data in made.items():
        (tmp / name).write_bytes(data)
    return {name: tmp / name for name in made}


# Inputs that ended in a traceback, a silent run or a misleading line before: command args
# (run in tmp_path, where the files above exist), extra environment, text of the line.
BAD_CLI = {
    "not utf-8": (["plan", "latin1.yaml"], {}, "config file latin1.yaml: not UTF-8"),
    "directory": (["plan", "."], {}, "config file . is a directory"),
    "duplicate key": (["plan", "dup.yaml"], {}, "duplicate key d_model (line 3)"),
    "NUL in a path": (["plan", "nul.yaml"], {}, "run.dir: "),
    "undecodable byte": (["plan", "--set", "run.dir=r\udcff"], {}, "run.dir: "),
    "very long path": (["plan", "p" * 5000 + ".yaml"], {}, "File name too long"),
    "device file": (["plan", "/dev/null"], {}, "/dev/null is not a regular file"),
    "unknown shipped name": (["plan", "llama9"], {}, "shipped: "),
    "negative seed": (["train", "--set", "train.seed=-1"], {}, "train.seed"),
    "64-bit seed": (["train", "--set", f"train.seed={2**63}"], {}, "train.seed"),
    "huge d_model": (["train", "--set", f"model.d_model={10**30}"], {}, "model.d_model"),
    "huge steps": (["train", "--set", f"train.steps={10**40}"], {}, "train.steps"),
    "huge vocab": (["train", "--set", f"model.vocab_size={2**62}"], {}, "model.vocab_size"),
    "infinite lr": (["train", "--set", "optim.lr=.inf"], {}, "optim.lr: must be a finite"),
    "lr beyond float": (["train", "--set", "optim.lr=" + "9" * 400], {}, "optim.lr"),
    "5000-digit int": (["train", "--set", "train.steps=" + "9" * 5000], {}, "train.steps"),
    "10k-char value": (["train", "--set", "model.family=" + LONG], {}, "model.family"),
    "float16 unscaled": (
        ["train", "--set", "model.compute_dtype=float16", "--set", "train.loss_scale.kind=none"],
        {},
        "train.loss_scale.kind",
    ),
    "unknown flag": (["train", "--bogus"], {}, "--bogus"),
    "launch: --nproc not a number": (["launch", "--nproc", "two", "--", "train"], {}, "--nproc"),
    "launch: too many processes": (["launch", "--nproc", "100000", "--", "train"], {}, "--nproc"),
    "--num-processes 0": (
        ["train", "--coordinator", "127.0.0.1:1234", "--num-processes", "0", "--process-id", "0"],
        {},
        "--num-processes: 0 must be >= 1",
    ),
    "coordinator without a port": (
        ["train", "--coordinator", "localhost", "--num-processes", "1", "--process-id", "0"],
        {},
        "--coordinator: expected HOST:PORT",
    ),
    "JAXTRAIN_NUM_PROCESSES=two": (
        ["train"],
        {"JAXTRAIN_COORDINATOR": "127.0.0.1:1234", "JAXTRAIN_NUM_PROCESSES": "two"},
        "JAXTRAIN_NUM_PROCESSES: expected an integer, got two",
    ),
    "JAXTRAIN_PROCESS_ID out of range": (
        ["train"],
        {
            "JAXTRAIN_COORDINATOR": "127.0.0.1:1234",
            "JAXTRAIN_NUM_PROCESSES": "2",
            "JAXTRAIN_PROCESS_ID": "2",
        },
        "JAXTRAIN_PROCESS_ID: 2 is not in [0, 2)",
    ),
    "SLURM_NTASKS=abc": (["train"], {"SLURM_NTASKS": "abc"}, "SLURM_NTASKS: expected an integer"),
    "SLURM_NTASKS=2 outside SLURM": (
        ["train"],
        {"SLURM_NTASKS": "2"},
        "jax.distributed: cannot join the run found through SLURM_NTASKS=2",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_bad_cli_input_is_one_clear_line(case, tmp_path):
    args, env, expected = BAD_CLI[case]
    files(tmp_path)
    run_dir = ["--set", f"run.dir={tmp_path / 'run'}"] if args[0] == "train" else []
    proc = jaxtrain(*args, *run_dir, env=env, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("jaxtrain: error: ") and expected in lines[0], lines[0]
    assert len(lines[0]) <= 420
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cli_empty_config_notes_and_plans(tmp_path):
    files(tmp_path)
    proc = jaxtrain("plan", "empty.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "jaxtrain: note: config file empty.yaml is empty; using the defaults\n"
    assert "memory per device" in proc.stdout


def test_cli_plans_a_shipped_config_by_name(tmp_path):
    proc = jaxtrain("plan", "tiny", cwd=tmp_path)  # no configs/ folder here
    assert proc.returncode == 0, proc.stderr
    assert "memory per device" in proc.stdout

"""int8 weight-only quantization: each weight is within half a scale of its float value,
the quantized model's logits and perplexity stay close to the float model's, the int8
arrays reach the jitted generate as int8, and ``jaxtrain quantize`` on a trained run and
on a Hugging Face fixture writes a directory ``jaxtrain generate --quantized`` reads."""

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from rich.console import Console

from jaxtrain import cli
from jaxtrain.data import load_tokenizer, open_dataset
from jaxtrain.generate.api import BUCKET, Generator
from jaxtrain.generate.decode import generate_tokens, left_pad
from jaxtrain.generate.quantize import (
    int8_paths,
    load_quantized,
    param_bytes,
    quantize_command,
    quantize_params,
)
from jaxtrain.generate.sampling import SamplingConfig
from jaxtrain.models import from_pretrained
from jaxtrain.models.dense import weight_einsum
from jaxtrain.models.quantized import QuantizedWeight, contracted_axes, quantize
from jaxtrain.sharding import param_logical_axes
from jaxtrain.train.runs import load_run

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
PROMPT = "def main("
TINY = ["model.n_layers=2", "model.d_model=64", "model.mlp_dim=128", "data.seq_len=32"]
# Measured +0.05 % (one scale per output channel) on the run below: a 20x margin, and far
# below what a wrong scale or layout gives (tens of percent, or more).
MAX_PERPLEXITY_INCREASE = 0.01


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny LLaMA trained for 30 steps: enough for a perplexity well below uniform."""
    run = tmp_path_factory.mktemp("quant") / "run"
    args = [*TINY, "train.global_batch=8", "train.steps=30", "train.eval_every=0"]
    args += ["optim.warmup_steps=5", "checkpoint.async_save=false", f"run.dir={run}"]
    assert cli.main(["train", "--no-sample", *(x for a in args for x in ("--set", a))]) == 0
    return run


@pytest.fixture(scope="module")
def quantized_run(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "int8"
    assert cli.main(["quantize", "--run", str(run_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The LLaMA fixture with a tokenizer.json (the GPT-2 fixture's word-level one)."""
    directory = tmp_path_factory.mktemp("quant") / "llama"
    shutil.copytree(FIXTURES / "llama", directory)
    shutil.copyfile(FIXTURES / "gpt2" / "tokenizer.json", directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory):
    """The LLaMA fixture as it is (no tokenizer.json), quantized."""
    out = tmp_path_factory.mktemp("quant") / "int8"
    quantize_command(str(out), hf=str(FIXTURES / "llama"))
    return out


def half_scale(q: QuantizedWeight) -> np.ndarray:
    """Each weight element's bound, scale / 2, laid out as the weight."""
    return np.asarray(QuantizedWeight(jnp.ones_like(q.values), q.scale / 2).dequantize())


def check_within_half_a_scale(w, q: QuantizedWeight) -> None:
    error = np.abs(np.asarray(w, np.float32) - np.asarray(q.dequantize()))
    assert np.all(error <= half_scale(q) * (1 + 1e-6)), float(error.max())


@pytest.mark.parametrize(
    "shape, contracted, lead, group",
    [
        ((48, 4, 8), 1, 0, 0),  # [D, N, H], one scale per output channel
        ((3, 48, 40), 1, 1, 16),  # stacked [layers, D, F] in groups of 16 inputs
        ((3, 4, 8, 48), 2, 1, 8),  # stacked [layers, N, H, D]: groups across N*H
    ],
)
def test_reconstruction_is_within_half_a_scale(shape, contracted, lead, group):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape).astype(np.float32) * np.linspace(0.01, 3.0, shape[-1])
    w[..., 0] = 0.0  # an all-zero output channel stays zero (with scale 1)
    q = quantize(w, contracted, lead=lead, group=group)
    c_in = int(np.prod(shape[lead : lead + contracted]))
    groups, c_out = (c_in // group if group else 1), int(np.prod(shape[lead + contracted :]))
    assert q.values.dtype == jnp.int8 and q.values.shape == shape
    assert q.scale.shape == (*shape[:lead], groups, c_out) and q.scale.dtype == jnp.float32
    check_within_half_a_scale(w, q)
    # Each group's scale is its own largest |w| over 127: that weight maps to +-127.
    amax = np.abs(w.reshape(*shape[:lead], groups, -1, c_out)).max(axis=-2)
    np.testing.assert_allclose(q.scale, np.where(amax > 0, amax / 127, 1.0), rtol=1e-6)
    assert int(np.abs(np.asarray(q.values)).max()) == 127
    assert not np.asarray(q.dequantize())[..., 0].any()


def test_which_weights_are_matmul_weights():
    assert contracted_axes(("layers", "embed", "heads", "head_dim")) == 1  # wq
    assert contracted_axes(("layers", "heads", "head_dim", "embed")) == 2  # wo
    assert contracted_axes(("layers", "mlp", "embed")) == 1  # w_down
    assert contracted_axes(("embed", "vocab")) == 1  # lm_head
    assert contracted_axes(("vocab", "embed")) == 0  # the embedding table: a lookup
    assert contracted_axes(("layers", "heads", "bias")) == 0
    assert contracted_axes(("layers", "norm")) == 0


def test_weight_einsum_dequantizes_the_int8_weight():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    w = rng.normal(size=(4, 8, 16)).astype(np.float32)
    q = quantize(w, 2, group=8)
    got = weight_einsum("BLNH,NHD->BLD", x, q, jnp.float32)
    want = jnp.einsum("BLNH,NHD->BLD", x, q.dequantize())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(got - jnp.einsum("BLNH,NHD->BLD", x, w)))) < 0.1


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, tokens):
    return nnx.merge(graphdef, params)(tokens)


def test_quantized_logits_are_close_to_float():
    cfg, model = from_pretrained(FIXTURES / "llama")
    ids = np.load(FIXTURES / "llama" / "input_ids.npy")
    graphdef, state = nnx.split(model, nnx.Param)
    params, logical = nnx.to_pure_dict(state), param_logical_axes(state)
    want = np.asarray(forward(graphdef, params, ids))
    quantized = quantize_params(params, logical, group_size=8)  # per channel: the run's test
    assert int8_paths(quantized) == [
        "blocks/attn/wk",
        "blocks/attn/wo",
        "blocks/attn/wq",
        "blocks/attn/wv",
        "blocks/mlp/w_down",
        "blocks/mlp/w_gate",
        "blocks/mlp/w_up",
        "lm_head",
    ]
    got = np.asarray(forward(graphdef, quantized, ids))
    # Measured 1.3 % (1.6 % with a scale per output channel): each weight of this random
    # model (std 0.15, 32 or 64 inputs) is off by ~0.8 % RMS, through 15 matmuls.
    relative = np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2))
    assert relative < 0.04, relative


def _is_q(x):
    return isinstance(x, QuantizedWeight)


def test_quantize_a_run_then_generate_int8(quantized_run, capsys):
    capsys.readouterr()
    args = ["generate", "--quantized", str(quantized_run), "--prompt", PROMPT]
    assert cli.main([*args, "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    generator = Generator.from_quantized(str(quantized_run))
    (text,) = generator([PROMPT], max_new_tokens=8)
    assert out == PROMPT + text + "\n" and text

    meta = json.loads((quantized_run / "quantization.json").read_text())
    assert meta["bits"] == 8 and meta["group_size"] is None
    assert meta["int8_weights"] == int8_paths(generator.params) and len(meta["int8_weights"]) == 8
    weights = [x for x in jax.tree.leaves(generator.params, is_leaf=_is_q) if _is_q(x)]
    assert all(isinstance(x.values, jax.Array) and x.values.dtype == jnp.int8 for x in weights)
    float32_bytes = sum(4 * x.values.size for x in weights)
    assert param_bytes(weights) < 0.3 * float32_bytes  # a byte per weight, a scale per 64
    # The program the CLI ran (same arguments: a cache hit) takes the int8 arrays as its
    # arguments, plus the prompt and the key.
    eos = generator.tokenizer.eos_id
    rows, pad = left_pad([generator.tokenizer.encode(PROMPT).tolist()], eos, multiple=BUCKET)
    sampling = SamplingConfig(greedy=True)
    compiled = generate_tokens.lower(
        generator.graphdef,
        generator.params,
        rows,
        pad,
        jax.random.PRNGKey(0),
        max_new=8,
        sampling=sampling,
        eos_id=eos,
        pad_id=eos,
        stream=True,
    ).compile()
    arguments = compiled.memory_analysis().argument_size_in_bytes
    int8_bytes = param_bytes(generator.params)
    assert int8_bytes <= arguments < int8_bytes + 1024, (arguments, int8_bytes)


def test_quantize_an_hf_model_then_generate(hf_dir, tmp_path, capsys):
    out = tmp_path / "int8"
    code = cli.main(["quantize", "--hf", str(hf_dir), "--out", str(out), "--group-size", "16"])
    assert code == 0 and "8 weights" in capsys.readouterr().out
    assert json.loads((out / "quantization.json").read_text())["group_size"] == 16
    assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    quantized, _ = load_quantized(str(out))
    scales = [x.scale for x in jax.tree.leaves(quantized.params, is_leaf=_is_q) if _is_q(x)]
    assert {s.shape[-2] for s in scales} == {2, 4}  # 32 or 64 inputs in groups of 16
    prompt = "the model trains"
    args = ["generate", "--quantized", str(out), "--prompt", prompt, "--max-new-tokens", "4"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith(prompt) and len(text) > len(prompt) + 1, text


def test_per_layer_error_and_perplexity_on_a_trained_run(run_dir, quantized_run):
    cfg, program, state, _ = load_run(str(run_dir), [], Console(quiet=True))
    float_params = jax.device_get(state.params)
    quantized, graphdef = load_quantized(str(quantized_run))
    # Every int8 weight written is within half its scale of the trained weight.
    flat = dict(jax.tree_util.tree_flatten_with_path(float_params)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(quantized.params, is_leaf=_is_q)[0]:
        if _is_q(leaf):
            check_within_half_a_scale(flat[path], leaf)
    tokenizer = load_tokenizer(cfg.data.tokenizer, eos_id=cfg.data.eos_id)
    loader = program.loader(open_dataset(cfg.data.path, tokenizer))
    batches = [jax.device_get(loader.eval_batch(i)) for i in range(2)]

    def perplexity(params):
        nll = []
        for batch in batches:
            logits = np.asarray(forward(graphdef, params, batch["inputs"]), np.float64)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll.append(-np.take_along_axis(logp, batch["targets"][..., None], -1).mean())
        return float(np.exp(np.mean(nll)))

    base = perplexity(float_params)
    assert base < 0.5 * cfg.model.vocab_size  # trained: far below a uniform guess
    increase = perplexity(quantized.params) / base - 1
    assert abs(increase) < MAX_PERPLEXITY_INCREASE, (base, increase)


@pytest.mark.parametrize(
    "args, key",
    [
        (["quantize", "--run", "/nonexistent/run", "--out", "OUT"], "--run"),
        (["quantize", "--hf", "/nonexistent/hf", "--out", "OUT"], "--hf"),
        (["quantize", "--hf", "HF", "--out", "FULL"], "--out"),
        (["quantize", "--hf", "HF", "--out", "OUT", "--group-size", "24"], "--group-size"),
        (["quantize", "--hf", "HF", "--out", "OUT", "--group-size", "-4"], "--group-size"),
        (["quantize", "--hf", "BERT", "--out", "OUT"], "--hf"),
        (["quantize", "--hf", "HF", "--out", "OUT", "--set", "mesh.fsdp=1"], "--set"),
        (["generate", "--quantized", "/nonexistent/q", "--prompt", "x"], "--quantized"),
        (["generate", "--quantized", "HF", "--prompt", "x"], "--quantized"),
        (["generate", "--hf", "QUANT", "--prompt", "x"], "--quantized"),
        (["generate", "--quantized", "NO_TOKENIZER", "--prompt", "x"], "tokenizer"),
    ],
)
def test_bad_input_gets_one_line(args, key, hf_dir, quantized_run, no_tokenizer, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    where = {
        "OUT": tmp_path / "out",
        "FULL": tmp_path / "full",
        "HF": hf_dir,
        "BERT": FIXTURES / "bert",
        "QUANT": quantized_run,
        "NO_TOKENIZER": no_tokenizer,
    }
    capsys.readouterr()
    assert cli.main([str(where.get(a, a)) for a in args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxtrain: error: ") and key in lines[0], err
    assert not (tmp_path / "out").exists()  # nothing written
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"

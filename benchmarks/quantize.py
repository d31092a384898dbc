"""int8 weight-only quantization: weight memory and perplexity, float32 vs bf16 vs int8.

For a trained run (the default model: ``jaxtrain train --set run.dir=/tmp/quant_default``)
and Hugging Face fixtures (``tests/fixtures/hf/*``: tiny models with random weights),
each model is written with ``jaxtrain quantize`` (one scale per output channel, and in
groups of inputs) and read back as ``jaxtrain generate --quantized`` reads it. Reported:

- bytes of the parameters handed to the jitted generate: float32 as trained; bf16 with
  every float parameter cast; int8: int8 matmul weights with float32 scales, the
  embedding table, norms and biases float32;
- for the run, the compiled ``generate_tokens`` program's argument and temporary bytes
  (XLA's memory analysis; batch 1, a 16-token prompt, 64 new tokens): the int8 weights
  are its arguments, and their dequantized copies are temporaries of one matmul each;
- perplexity, exp(mean next-token NLL): for the run, on its ``train.eval_batches``
  validation batches (the ones ``jaxtrain eval`` scores; its loss is printed to check
  the float32 row); for a fixture, on its own ``input_ids.npy`` (2 rows of 24 tokens,
  23 predictions each).

    python benchmarks/quantize.py --run /tmp/quant_default --group-sizes 64,32
"""

from __future__ import annotations

import argparse
import functools
import math
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console

from jaxtrain import models
from jaxtrain.data import load_tokenizer, open_dataset
from jaxtrain.errors import UserError
from jaxtrain.generate.decode import generate_tokens
from jaxtrain.generate.quantize import load_quantized, param_bytes, quantize_command
from jaxtrain.generate.sampling import SamplingConfig
from jaxtrain.models import from_pretrained
from jaxtrain.train.loop import evaluate
from jaxtrain.train.runs import load_run

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "tests" / "fixtures" / "hf"
DECODER_FIXTURES = ("llama", "llama3", "qwen2", "qwen3", "mistral", "gpt2")


@functools.partial(jax.jit, static_argnums=0)
def nll_sum(graphdef, params, inputs, targets):
    """(summed next-token NLL, token count) of one batch, in float32."""
    logits = nnx.merge(graphdef, params)(inputs).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)
    return -jnp.sum(picked), targets.size


def perplexity(graphdef, params, batches) -> tuple[float, float]:
    """(mean NLL per token, perplexity) over ``batches`` of (inputs, targets)."""
    total, count = 0.0, 0
    for inputs, targets in batches:
        loss, n = nll_sum(graphdef, params, inputs, targets)
        total, count = total + float(loss), count + int(n)
    return total / count, math.exp(total / count)


def to_bf16(params):
    return jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


def graph(cfg):
    """The model's graphdef, unsharded, built without allocating."""
    abstract = nnx.eval_shape(lambda: models.build(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param)[0]


def generate_memory(graphdef, params) -> str:
    """ "argument MiB / temporary MiB" of the compiled generate (batch 1, 16 + 64 tokens)."""
    prompt, pad = np.zeros((1, 16), np.int32), np.zeros((1,), np.int32)
    compiled = generate_tokens.lower(
        graphdef,
        params,
        prompt,
        pad,
        jax.random.PRNGKey(0),
        max_new=64,
        sampling=SamplingConfig(greedy=True),
    ).compile()
    stats = compiled.memory_analysis()
    return f"{stats.argument_size_in_bytes / 2**20:.3f} / {stats.temp_size_in_bytes / 2**20:.3f}"


def rows(name, graphdef, float_params, batches, quantize, group_sizes, memory=False):
    """Table rows: (model, weights, MiB, generate MiB, NLL, perplexity, change)."""
    out = []
    base_nll, base = perplexity(graphdef, float_params, batches)
    variants = [("float32", float_params), ("bf16", to_bf16(float_params))]
    for group in (0, *group_sizes):
        label = f"int8, groups of {group}" if group else "int8, per output channel"
        try:
            variants.append((label, quantize(group)))
        except UserError as err:
            print(f"{name}: {label}: skipped ({err})")
    for label, params in variants:
        nll, ppl = (base_nll, base) if label == "float32" else perplexity(graphdef, params, batches)
        mib = f"{param_bytes(params) / 2**20:.3f}"
        compiled = generate_memory(graphdef, params) if memory else "–"
        change = f"{100 * (ppl / base - 1):+.3f} %"
        out.append((name, label, mib, compiled, f"{nll:.4f}", f"{ppl:.3f}", change))
    return out


def run_rows(run: str, group_sizes, tmp: Path):
    cfg, program, state, step = load_run(run, [], Console(stderr=True))
    tokenizer = load_tokenizer(cfg.data.tokenizer, eos_id=cfg.data.eos_id)
    loader = program.loader(open_dataset(cfg.data.path, tokenizer))
    n = cfg.train.eval_batches
    loss = evaluate(program, state.params, loader, n)
    print(f"{run}: step {step}, jaxtrain eval loss {loss:.4f}")
    batches = []
    for i in range(n):
        batch = jax.device_get(loader.eval_batch(i))
        batches.append((batch["inputs"], batch["targets"]))
    tokens = sum(t.size for _, t in batches)
    print(f"{run}: {n} validation batches, {tokens} tokens")

    def quantize(group):
        out = tmp / f"run-g{group}"
        print(quantize_command(str(out), run=run, group_size=group, console=Console(quiet=True)))
        return load_quantized(str(out))[0].params

    name = f"default model ({Path(run).name}, step {step})"
    float_params = jax.device_get(state.params)
    return rows(name, graph(cfg.model), float_params, batches, quantize, group_sizes, True)


def fixture_rows(fixture: str, group_sizes, tmp: Path):
    cfg, model = from_pretrained(FIXTURES / fixture)
    graphdef, state = nnx.split(model, nnx.Param)
    ids = np.load(FIXTURES / fixture / "input_ids.npy")
    batches = [(ids[:, :-1], ids[:, 1:])]

    def quantize(group):
        out = tmp / f"{fixture}-g{group}"
        quantize_command(str(out), hf=str(FIXTURES / fixture), group_size=group)
        return load_quantized(str(out))[0].params

    float_params = nnx.to_pure_dict(state)
    return rows(f"HF fixture {fixture}", graphdef, float_params, batches, quantize, group_sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run directory (the default model)")
    parser.add_argument("--hf", nargs="*", default=list(DECODER_FIXTURES), metavar="NAME")
    parser.add_argument("--group-sizes", default="64,32", help="comma-separated")
    parser.add_argument("--fixture-group-sizes", default="16", help="comma-separated")
    args = parser.parse_args()
    sizes = [int(x) for x in args.group_sizes.split(",") if x]
    fixture_sizes = [int(x) for x in args.fixture_group_sizes.split(",") if x]
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            table += run_rows(args.run, sizes, Path(tmp))
        for fixture in args.hf:
            table += fixture_rows(fixture, fixture_sizes, Path(tmp))
    print()
    header = ("model", "weights", "parameter MiB", "generate args / temps MiB", "NLL")
    print("| " + " | ".join((*header, "perplexity", "vs float32")) + " |")
    print("|---" * 7 + "|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

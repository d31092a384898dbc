"""The ``jaxtrain`` command: ``train``, ``plan``, ``prepare``, ``eval``, ``export``,
``generate`` and ``launch``.

A mistake the user can fix (bad config, missing data, unknown model) ends with one line
on stderr and exit status 2; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from jaxtrain.errors import UserError, one_line

if typing.TYPE_CHECKING:
    from rich.console import Console

    from jaxtrain.config import Config
    from jaxtrain.train.loop import RunResult


class _Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported like every other: one ``jaxtrain: error:``
    line (and exit status 2), pointing at ``--help`` instead of printing the usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"jaxtrain: error: {one_line(message)} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxtrain", description="Train Transformer models with JAX/XLA SPMD.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_source(p: argparse.ArgumentParser) -> None:
        """--run, --hf or --quantized: the model generate and serve read."""
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--run", metavar="DIR", help="a run directory")
        source.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory")
        source.add_argument("--quantized", metavar="DIR", help="a directory from jaxtrain quantize")

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", nargs="?", help="YAML config (default: the tiny CPU model)")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a dotted config key, e.g. --set train.steps=20",
        )

    train = sub.add_parser("train", help="train a model")
    config_args(train)
    train.add_argument(
        "--coordinator", metavar="HOST:PORT", help="multi-process: process 0's address"
    )
    train.add_argument("--num-processes", type=int, help="multi-process: how many processes")
    train.add_argument("--process-id", type=int, help="multi-process: this process's rank")
    train.add_argument("--dry-run", action="store_true", help="print the sharding plan and exit")
    train.add_argument(
        "--no-sample", action="store_true", help="no sample from the trained model at the end"
    )
    plan = sub.add_parser(
        "plan",
        help="compile a config's train step and print its memory and traffic per device",
        description="Compile the real train step for the config's mesh (on N simulated "
        "devices with --devices or target.devices) and print memory per device by category "
        "and collective bytes per step against ZeRO's ideal. Nothing is trained or allocated.",
    )
    config_args(plan)
    plan.add_argument(
        "--devices", type=int, metavar="N", help="simulate N devices (default: target.devices)"
    )
    plan.add_argument(
        "--hbm",
        metavar="SIZE",
        help="memory per device, e.g. 80GiB (default: target.hbm_gib): say whether it fits "
        "with 10%% headroom, and if not, the cheapest change that does",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--params", action="store_true", help="also print every array's sharding")
    plan.add_argument(
        "--remat",
        action="store_true",
        help="also compile the step under every model.remat policy and compare their memory",
    )

    for name, text in (
        ("eval", "validation loss of a run's newest checkpoint"),
        ("export", "write a run's newest parameters (no optimizer state) for inference"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--run", required=True, metavar="DIR", help="a run directory")
        if name == "export":
            cmd.add_argument("--out", required=True, metavar="DIR")
            cmd.add_argument(
                "--format",
                choices=("orbax", "hf"),
                default="orbax",
                help="orbax checkpoint, or a Hugging Face model directory (safetensors)",
            )
        cmd.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE"
        )

    gen = sub.add_parser(
        "generate",
        help="continue prompts with a run's model or a Hugging Face model",
        description="Generate text from a run's newest checkpoint (--run), a Hugging Face "
        "model directory with its tokenizer.json (--hf) or an int8 model written by jaxtrain "
        "quantize (--quantized). One prompt streams to the terminal as it is produced; "
        "several are generated as one batch.",
    )
    model_source(gen)
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT")
    gen.add_argument("--prompt-file", metavar="FILE", help="a UTF-8 file: one prompt per line")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    gen.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample"
    )
    gen.add_argument("--top-k", type=int, default=0, metavar="K", help="0: off")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1: off")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="1: off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string")
    gen.add_argument(
        "--num-beams", type=int, default=1, metavar="N", help="> 1: beam search (greedy only)"
    )
    gen.add_argument(
        "--length-penalty", type=float, default=1.0, help="beam search: > 0 favours longer text"
    )
    gen.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    srv = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API with continuous batching",
        description="Serve a run's newest checkpoint (--run), a Hugging Face model directory "
        "(--hf) or an int8 model (--quantized): POST /v1/completions and "
        "/v1/chat/completions (OpenAI API, streaming included), GET /v1/models, /health and "
        "/metrics (Prometheus). Requests share a batch of --max-batch decode rows; SIGTERM "
        "finishes the requests in flight and exits 0.",
    )
    model_source(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default local)")
    srv.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    srv.add_argument("--max-batch", type=int, default=8, metavar="N", help="decode rows")
    srv.add_argument(
        "--max-len", type=int, metavar="L",
        help="positions per request, prompt included (default: the model's, at most 2048)",
    )  # fmt: skip
    srv.add_argument(
        "--max-queue", type=int, default=64, metavar="N",
        help="requests that may wait for a row; more get 429",
    )  # fmt: skip
    srv.add_argument(
        "--prefill-chunk", type=int, default=256, metavar="T",
        help="longest prompt chunk read between decode steps",
    )  # fmt: skip
    srv.add_argument("--api-key", metavar="KEY", help="require Authorization: Bearer KEY")
    srv.add_argument("--name", help="the model's name in the API (default: the directory's)")
    srv.add_argument(
        "--shutdown-timeout", type=float, default=30.0, metavar="S",
        help="on SIGTERM, wait at most S seconds for requests in flight",
    )  # fmt: skip
    srv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    quant = sub.add_parser(
        "quantize",
        help="write a run's or a Hugging Face model's matmul weights as int8 for generate",
        description="Post-training int8 weight-only quantization: every matmul weight "
        "(attention, MLP, an untied LM head) is stored as int8 with a float32 scale per output "
        "channel, or per group of --group-size inputs (symmetric); embeddings, norms and "
        "biases stay float. Generate from it with jaxtrain generate --quantized DIR2.",
    )
    quant_source = quant.add_mutually_exclusive_group(required=True)
    quant_source.add_argument("--run", metavar="DIR", help="a run directory (newest checkpoint)")
    quant_source.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory")
    quant.add_argument("--out", required=True, metavar="DIR2", help="a new or empty directory")
    quant.add_argument(
        "--group-size",
        type=int,
        default=0,
        metavar="N",
        help="inputs per scale, dividing every weight's input size (default: one scale per "
        "output channel)",
    )
    quant.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --run: override a key of the run's config (e.g. mesh.fsdp=1)",
    )

    launch = sub.add_parser(
        "launch",
        help="run a command as several processes on this machine (jax.distributed)",
        description="Run `jaxtrain train ...` as N processes joined through 127.0.0.1, "
        "e.g. jaxtrain launch --nproc 2 --devices-per-proc 4 -- train --set mesh.fsdp=8",
    )
    launch.add_argument("--nproc", type=int, required=True, help="number of processes")
    launch.add_argument(
        "--devices-per-proc", type=int, metavar="M", help="simulated CPU devices per process"
    )
    launch.add_argument(
        "command_args", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="e.g. -- train"
    )

    prep = sub.add_parser(
        "prepare",
        help="tokenize .txt/.jsonl/.parquet into token files",
        description="Tokenize UTF-8 .txt/.jsonl/.parquet documents into DIR. The dataset is "
        "written aside and moved into place only once complete; an existing one is replaced "
        "only with --overwrite.",
    )
    prep.add_argument("--input", nargs="+", required=True, metavar="PATH")
    prep.add_argument("--output", required=True, metavar="DIR")
    prep.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DIR if it already holds a prepared dataset (it is kept if prepare fails)",
    )
    prep.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json path")
    prep.add_argument(
        "--eos-id",
        type=int,
        default=-1,
        metavar="ID",
        help="end-of-document id (data.eos_id); -1: the tokenizer's own",
    )
    prep.add_argument("--val-fraction", type=float, default=0.01)
    prep.add_argument("--seed", type=int, default=0)
    return parser


def _train(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    from rich.console import Console

    from jaxtrain import config

    cfg = config.load(args.config, args.overrides)
    # Off a terminal (logs, CI, pipes) keep lines and tables whole instead of wrapping at 80.
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)
    if not out.is_terminal:
        out = Console(soft_wrap=True, width=200)
    if args.command == "plan":
        from jaxtrain.plan.command import plan_command

        if args.devices is not None and args.devices < 0:
            raise UserError(f"--devices: must be >= 0, got {args.devices}")
        return plan_command(
            cfg,
            list(sys.argv[1:] if argv is None else argv),
            out,
            devices=args.devices,
            hbm=args.hbm,
            as_json=args.json,
            show_params=args.params,
            compare_remat=args.remat,
        )
    if args.dry_run:
        from jaxtrain.plan import print_plan

        print_plan(cfg, out)
        return 0
    from jaxtrain import distributed
    from jaxtrain.train.loop import train

    if distributed.initialize(args.coordinator, args.num_processes, args.process_id):
        import jax

        out.quiet = jax.process_index() != 0  # one process speaks for the run...
    out.print("resolved config:", style="bold")
    out.print(cfg.to_yaml(), highlight=False, markup=False)
    result = train(cfg, err)
    if result.stopped_by_signal:
        out.quiet = False  # ...but every process says where it stopped
        out.print(
            f"stopped by {result.stopped_by_signal} at step {result.end_step}; checkpoint saved "
            f"in {result.checkpoint_dir}; run the same command again to resume",
            highlight=False,
            markup=False,
        )
        return 0
    evals = result.eval_losses
    if evals:
        first, last = min(evals), max(evals)
        out.print(
            f"validation loss: {evals[first]:.4f} (step {first}) -> {evals[last]:.4f} "
            f"(step {last})",
            highlight=False,
        )
    out.print(f"run directory: {result.run_dir}", highlight=False, markup=False)
    out.print(f"  metrics:     {result.metrics_path}", highlight=False, markup=False)
    out.print(f"  tensorboard: {result.tensorboard_dir}", highlight=False, markup=False)
    out.print(f"  parameters:  {result.params_dir}", highlight=False, markup=False)
    out.print(f"  checkpoints: {result.checkpoint_dir}", highlight=False, markup=False)
    if not args.no_sample:
        _sample(cfg, result, out)
    return 0


def _sample(cfg: Config, result: RunResult, out: Console) -> None:
    """Print ``sample.max_new_tokens`` tokens of the trained model continuing
    ``sample.prompt`` (every process generates: the parameters are sharded over all)."""
    from jaxtrain.generate.api import DECODERS, Generator
    from jaxtrain.generate.sampling import SamplingConfig

    sample = cfg.sample
    if sample.max_new_tokens == 0:
        return
    if cfg.model.family not in DECODERS or cfg.train.objective != "causal_lm":
        out.print(f"(no sample: {cfg.model.family} with {cfg.train.objective} does not generate)")
        return
    generator = Generator.from_program(cfg, result.program, result.params)
    sampling = SamplingConfig.at_temperature(sample.temperature)
    (text,) = generator(
        [sample.prompt], max_new_tokens=sample.max_new_tokens, sampling=sampling,
        seed=cfg.train.seed,
    )  # fmt: skip
    how = "greedy" if sampling.greedy else f"temperature {sample.temperature}"
    out.print(f"sample ({sample.max_new_tokens} tokens, {how}):", style="bold")
    if not out.quiet:  # as generated: rich would drop control characters
        print(sample.prompt + text, flush=True)


def _read_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from jaxtrain.train.runs import eval_run, export_run

    err = Console(stderr=True, soft_wrap=True)
    if args.command == "eval":
        step, loss = eval_run(args.run, args.overrides, err)
        print(f"step {step}: validation loss {loss:.4f}")
    else:
        step = export_run(args.run, args.out, args.overrides, err, fmt=args.format)
        print(f"wrote the parameters of step {step} to {args.out} ({args.format})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from jaxtrain.generate.beam import BeamConfig
    from jaxtrain.generate.sampling import SamplingConfig

    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--prompt-file: cannot read {args.prompt_file}: {err}") from None
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError("--prompt: give a prompt (--prompt TEXT or --prompt-file FILE)")
    sampling = SamplingConfig.at_temperature(
        args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )
    beams = None
    if args.num_beams != 1:
        beams = BeamConfig(num_beams=args.num_beams, length_penalty=args.length_penalty)
    generator = _load_generator(args)
    one = len(prompts) == 1

    def show(row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if one:
        sys.stdout.write(prompts[0])
    texts = generator(
        prompts,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        beams=beams,
        seed=args.seed,
        stop=args.stop,
        on_text=show if one else None,
    )
    if one:
        sys.stdout.write("\n")
    else:
        for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
            print(f"[{i}] {prompt}{text}")
    return 0


def _load_generator(args: argparse.Namespace):
    """The model of ``--run``, ``--hf`` or ``--quantized``, ready to generate."""
    from jaxtrain.generate.api import Generator

    _refuse_quantized(args)
    if args.quantized:
        return Generator.from_quantized(args.quantized)
    if args.run:
        return Generator.from_run(args.run, args.overrides)
    return Generator.from_hf(args.hf)


def _serve(args: argparse.Namespace) -> int:
    import importlib.util

    for module in ("fastapi", "uvicorn", "prometheus_client", "jinja2"):
        if importlib.util.find_spec(module) is None:
            raise UserError(f"serve: {module} is not installed; pip install 'jaxtrain[serve]'")
    from jaxtrain.serve.server import ServeOptions, check_options, serve

    if args.overrides and not args.run:
        raise UserError("--set: applies to --run only")
    opts = ServeOptions(
        host=args.host, port=args.port, max_batch=args.max_batch, max_len=args.max_len,
        max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, api_key=args.api_key,
        name=args.name, shutdown_timeout=args.shutdown_timeout,
    )  # fmt: skip
    check_options(opts)
    generator = _load_generator(args)
    return serve(generator, Path(args.run or args.hf or args.quantized), opts)


def _refuse_quantized(args: argparse.Namespace) -> None:
    """A directory from ``jaxtrain quantize`` is neither a run nor an HF model: say which
    flag reads it."""
    from jaxtrain.generate.quantize import is_quantized

    for flag, path in (("--run", args.run), ("--hf", args.hf)):
        if path and is_quantized(path):
            raise UserError(f"{flag}: {path} holds an int8 model; use --quantized {path}")


def _quantize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from jaxtrain.generate.quantize import quantize_command

    if args.hf and args.overrides:
        raise UserError("--set: applies to --run only")
    print(
        quantize_command(
            args.out,
            run=args.run,
            hf=args.hf,
            group_size=args.group_size,
            overrides=args.overrides,
            console=Console(stderr=True, soft_wrap=True),
        )
    )
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from jaxtrain.data import prepare, prepare_warnings

    summary = prepare(
        args.input,
        args.output,
        args.tokenizer,
        val_fraction=args.val_fraction,
        seed=args.seed,
        eos_id=args.eos_id,
        overwrite=args.overwrite,
    )
    for warning in prepare_warnings(summary):
        print(f"jaxtrain: warning: {warning}", file=sys.stderr)
    splits = ", ".join(f"{k}: {v['tokens']:,} tokens" for k, v in summary["splits"].items())
    print(f"wrote {args.output} ({splits}); use it with --set data.path={args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        if argv is None:  # a command line: how large host blocks are allocated (hostmem)
            from jaxtrain.hostmem import reexec

            reexec()
        args = _parser().parse_args(argv)
        if args.command == "prepare":
            return _prepare(args)
        if args.command == "launch":
            from jaxtrain.launch import launch

            command = (
                args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
            )
            return launch(command, args.nproc, devices_per_proc=args.devices_per_proc)
        if args.command in ("eval", "export"):
            return _read_run(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "quantize":
            return _quantize(args)
        return _train(args, argv)
    except UserError as err:
        # one_line: a backstop for a message that quotes more input than it should.
        print(f"jaxtrain: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Text in, text out: a trained run or a Hugging Face model generating from prompts.

``Generator.from_run(DIR)``, ``Generator.from_hf(DIR)`` or
``Generator.from_quantized(DIR)`` (int8 weights, :mod:`jaxtrain.generate.quantize`) loads
the model and its tokenizer; ``generator(prompts, ...)`` encodes the prompts, left-pads
them into a shape bucket (prompt length rounded up to ``BUCKET``, so nearby lengths share
one compile), runs :func:`jaxtrain.generate.decode.generate_tokens` and decodes the new
tokens, cut at the first stop string. ``on_text`` receives each step's new text per row
as the device produces it (``jaxtrain generate`` streams it to the terminal).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from jaxtrain.config import Config, ModelConfig
from jaxtrain.data import load_tokenizer
from jaxtrain.errors import UserError
from jaxtrain.generate.beam import BeamConfig, beam_search
from jaxtrain.generate.decode import generate_tokens, left_pad, streaming
from jaxtrain.generate.sampling import SamplingConfig

if TYPE_CHECKING:
    from jaxtrain.train.program import Program

BUCKET = 16  # prompt lengths are padded to a multiple of this
DECODERS = ("llama", "gpt2", "t5")  # families with a KV-cache decode (+ Mistral, Qwen2/3)


@dataclasses.dataclass(frozen=True)
class Generator:
    """A model ready to generate: its config, its graph and parameters, its tokenizer."""

    model: ModelConfig
    graphdef: Any
    params: Any
    tokenizer: Any

    @classmethod
    def from_run(cls, run: str, overrides: Sequence[str] = (), console: Any = None) -> Generator:
        """The newest checkpoint of a run directory, with the run's tokenizer.

        Raises:
            UserError: if ``run`` is not a run directory, has no checkpoint, or its model
                family cannot generate yet.
        """
        from rich.console import Console

        from jaxtrain.train.runs import load_run

        cfg, program, state, _ = load_run(run, overrides, console or Console(stderr=True))
        _check_family(cfg.model, "--run")
        return cls.from_program(cfg, program, program.model_params(state.params))

    @classmethod
    def from_program(cls, cfg: Config, program: Program, params: Any) -> Generator:
        """The model a training program trains, with ``params`` laid out as it holds
        them but in the model's order of layers (:meth:`Program.model_params`; the sample
        at the end of ``jaxtrain train``), and the run's tokenizer."""
        from jaxtrain.train.state import model_spec

        tokenizer = load_tokenizer(cfg.data.tokenizer, eos_id=cfg.data.eos_id)
        # The parameters stay as the run shards them; a batch of prompts is too small to
        # split over the batch axes (and a step's one token over sequence), so the model
        # is traced with its rows and length whole.
        spec = model_spec(cfg, program.mesh, program.rules.for_generation())
        return cls(cfg.model, spec.graphdef, program.device_params(params), tokenizer)

    @classmethod
    def from_hf(cls, path: str) -> Generator:
        """A Hugging Face model directory (config.json, safetensors, tokenizer.json).

        Raises:
            UserError: for an unreadable directory, a family that cannot generate yet or
                a directory without ``tokenizer.json``.
        """
        from jaxtrain.models import from_pretrained

        if not (Path(path) / "tokenizer.json").is_file():
            raise UserError(f"--hf: {path} has no tokenizer.json to encode the prompt with")
        cfg, model = from_pretrained(path)
        _check_family(cfg, "--hf")
        graphdef, params = nnx.split(model)
        return cls(cfg, graphdef, params, load_tokenizer(str(path)))

    @classmethod
    def from_quantized(cls, path: str) -> Generator:
        """A directory written by ``jaxtrain quantize``: its int8 weights stay int8 on the
        device and are dequantized inside each matmul.

        Raises:
            UserError: if ``path`` is not such a directory, does not match its model, or
                has no tokenizer.
        """
        from jaxtrain.generate.quantize import load_quantized

        quantized, graphdef = load_quantized(path)
        _check_family(quantized.model, "--quantized")
        if quantized.tokenizer is None:
            raise UserError(
                f"--quantized: {path} has no tokenizer to encode the prompt with (its "
                "source had no tokenizer.json)"
            )
        return cls(quantized.model, graphdef, quantized.params, quantized.tokenizer)

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 64,
        sampling: SamplingConfig | None = None,
        beams: BeamConfig | None = None,
        seed: int = 0,
        stop: Sequence[str] = (),
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[str]:
        """The text each prompt continues with.

        Args:
            prompts: one or more prompts (a batch; lengths may differ; an empty one starts
                a new document).
            max_new_tokens: the most tokens generated per prompt.
            sampling: how tokens are picked (default: greedy).
            beams: beam search instead (greedy only; the text arrives at the end, once the
                best hypothesis is known).
            seed: the sampling seed.
            stop: strings that end a row's text (the text is cut before them; the device
                runs to EOS or ``max_new_tokens``).
            on_text: called with (row, new text) as each step's tokens arrive.

        Returns:
            The generated text of each prompt, EOS and stop string excluded.
        """
        if not prompts:
            raise UserError("--prompt: give at least one prompt")
        if max_new_tokens < 1:
            raise UserError("--max-new-tokens: must be positive")
        sampling = sampling or SamplingConfig(greedy=True)
        if beams is not None and sampling != SamplingConfig(greedy=True):
            raise UserError(
                "--num-beams: beam search ranks hypotheses by likelihood; it takes no "
                "--temperature, --top-k, --top-p or --repetition-penalty"
            )
        eos = self.tokenizer.eos_id
        # An empty prompt starts a new document: the end-of-document token.
        encoded = [self.tokenizer.encode(p).tolist() or [eos] for p in prompts]
        self._check_positions(max(len(ids) for ids in encoded), max_new_tokens)
        rows, pad = left_pad(encoded, pad_id=eos, multiple=BUCKET)
        texts = TextStream(self.tokenizer, len(prompts), eos, stop, on_text)
        if beams is not None:
            tokens, counts, _ = beam_search(
                self.graphdef, self.params, rows, pad, max_new=max_new_tokens, beams=beams,
                eos_id=eos, pad_id=eos,
            )  # fmt: skip
            tokens, counts = tokens[:, 0], counts[:, 0]
        else:
            with streaming(texts.add):
                tokens, counts = generate_tokens(
                    self.graphdef, self.params, rows, pad, jax.random.PRNGKey(seed),
                    max_new=max_new_tokens, sampling=sampling, eos_id=eos, pad_id=eos,
                    stream=on_text is not None,
                )  # fmt: skip
        tokens, counts = np.asarray(tokens), np.asarray(counts)
        out = []
        for row, count in zip(tokens, counts, strict=True):
            ids = [t for t in row[:count].tolist() if t != eos]
            out.append(cut_at_stop(self.tokenizer.decode(ids), stop))
        texts.finish(out)
        return out

    def _check_positions(self, longest: int, max_new: int) -> None:
        from jaxtrain.models import FAMILIES

        limit = FAMILIES[self.model.family].max_positions(self.model)
        if limit is not None and longest + max_new > limit:
            raise UserError(
                f"--max-new-tokens: a {longest}-token prompt and {max_new} new tokens need "
                f"{longest + max_new} positions; {self.model.family} has learned positions "
                f"and model.max_seq_len={limit} (at most {max(limit - longest, 0)} new tokens)"
            )


def _check_family(cfg: ModelConfig, where: str) -> None:
    if cfg.family not in DECODERS:
        raise UserError(
            f"{where}: generation is not implemented for model.family={cfg.family} yet "
            f"(it is for {', '.join(DECODERS)})"
        )


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to its first stop string."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(ends)] if ends else text


class TextStream:
    """Turns each step's tokens into each row's new text for ``on_text``: the decoded
    text so far, less what was already handed out. Held back until the next token: an
    incomplete character, and an ending that may be the start of a stop string."""

    def __init__(self, tokenizer, rows, eos, stop, on_text):
        self.tokenizer, self.eos, self.stop, self.on_text = tokenizer, eos, stop, on_text
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [""] * rows
        self.done = [False] * rows

    def add(self, tokens: np.ndarray) -> None:
        if self.on_text is None:
            return
        for row, token in enumerate(tokens.tolist()):
            if self.done[row]:
                continue
            if token == self.eos:
                self.done[row] = True
                continue
            self.ids[row].append(token)
            text = self.tokenizer.decode(self.ids[row])
            cut = cut_at_stop(text, self.stop)
            if len(cut) < len(text):
                self.done[row] = True
            if text.endswith("\ufffd") and not self.done[row]:
                continue  # wait for the rest of a multi-byte character
            if not self.done[row]:
                cut = cut[: len(cut) - _stop_prefix(cut, self.stop)]
            if len(cut) > len(self.sent[row]):
                self.on_text(row, cut[len(self.sent[row]) :])
                self.sent[row] = cut

    def finish(self, texts: Sequence[str]) -> None:
        """Hand out what is still held back (an incomplete character at the end)."""
        if self.on_text is None:
            return
        for row, text in enumerate(texts):
            if len(text) > len(self.sent[row]):
                self.on_text(row, text[len(self.sent[row]) :])
                self.sent[row] = text


def _stop_prefix(text: str, stop: Sequence[str]) -> int:
    """The length of the longest ending of ``text`` that begins a stop string (0: none)."""
    return max(
        (k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
        default=0,
    )

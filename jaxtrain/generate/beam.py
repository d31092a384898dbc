"""Beam search on the device: the ``num_beams`` likeliest continuations, as transformers.

Each row keeps ``num_beams`` running hypotheses and the ``num_beams`` best finished ones.
A step scores every (beam, token) continuation by its summed log-probability, takes the
best ``2 * num_beams``, finishes those among the top ``num_beams`` that end in EOS (or
reach ``max_new`` tokens), scored ``sum_logprobs / length ** length_penalty`` (length:
new tokens, EOS included), and keeps the best ``num_beams`` unfinished ones running. The
search stops when no running beam can still beat the worst finished one by
transformers' heuristic (``early_stopping``: False, its default; True: once
``num_beams`` hypotheses are finished; ``"never"``), or at ``max_new`` tokens. This is
transformers' ``generate(num_beams=...)`` step for step (its ``_beam_search``), without
logits processors, with static shapes, in one ``lax.while_loop``.

The model is driven through ``prefill`` and ``step`` (:mod:`jaxtrain.models.decoding`):
the prompts are read once, then copied to each beam; after each step the cached keys and
values follow their beams (``DecodeState.take``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtrain.errors import UserError

# transformers' stand-in for "impossible": added to a score to rule a hypothesis out.
NEVER = -1.0e9


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """Beam search settings, as transformers names them; hashable (a static argument).

    ``length_penalty`` > 0 favours longer finished hypotheses, < 0 shorter ones.
    ``early_stopping``: False (a running beam is dropped once, at its current length,
    it could not beat the worst finished one), True (stop once ``num_beams`` are
    finished) or ``"never"`` (with a positive length penalty, judge running beams at
    ``max_new`` tokens).
    """

    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self):
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise UserError(f"--num-beams: must be a positive integer, got {self.num_beams!r}")
        if self.early_stopping not in (False, True, "never"):
            raise UserError(
                f"early_stopping: must be false, true or 'never', got {self.early_stopping!r}"
            )


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, N, ...] at index [B, M] along axis 1: [B, M, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "beams", "eos_id", "pad_id"))
def beam_search(
    graphdef: Any,
    state: Any,
    prompts: jax.Array,
    pad: jax.Array,
    *,
    max_new: int,
    beams: BeamConfig,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best finished hypotheses of each left-padded prompt.

    Args:
        graphdef, state: the model split by ``nnx.split`` (with ``prefill`` and ``step``).
        prompts: [B, T] int32, row b left-padded by ``pad[b]`` tokens.
        pad: [B] int32.
        max_new: the most tokens per hypothesis.
        beams: the search's settings.
        eos_id: a hypothesis finishes with it (None: only at ``max_new`` tokens).
        pad_id: fills each hypothesis after its end.

    Returns:
        ([B, num_beams, max_new] int32 tokens, best first; [B, num_beams] int32 lengths,
        EOS included; [B, num_beams] float32 scores).
    """
    model = nnx.merge(graphdef, state)
    batch, width = prompts.shape[0], beams.num_beams
    keep = 2 * width  # transformers keeps max(2, 1 + number of EOS ids) * num_beams
    penalty = beams.length_penalty
    logits, decoding = model.prefill(prompts, pad, max_new)
    decoding = decoding.take(jnp.repeat(jnp.arange(batch), width))
    logits = jnp.repeat(logits, width, axis=0)
    vocab = logits.shape[-1]

    running = jnp.full((batch, width, max_new), pad_id, jnp.int32)
    # Only the first beam starts live, so the first step does not pick one token `width` times.
    running_score = jnp.zeros((batch, width), jnp.float32).at[:, 1:].set(NEVER)
    done = jnp.full((batch, width, max_new), pad_id, jnp.int32)
    done_score = jnp.full((batch, width), NEVER, jnp.float32)
    done_len = jnp.zeros((batch, width), jnp.int32)
    finished = jnp.zeros((batch, width), bool)
    improvable = jnp.ones((batch,), bool)
    hits = jnp.zeros((batch, keep), bool)
    is_top = jnp.arange(keep) < width

    def going(carry):
        step, *_, finished, improvable, hits = carry
        open_beam = ~(jnp.all(finished) & (beams.early_stopping is True))
        return (step < max_new) & jnp.any(improvable) & open_beam & ~jnp.all(hits)

    def body(carry):
        step, logits, decoding, running, running_score, done, done_score, done_len = carry[:8]
        finished, improvable, _ = carry[8:]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        total = log_probs.reshape(batch, width, vocab) + running_score[:, :, None]
        top_score, top = jax.lax.top_k(total.reshape(batch, width * vocab), keep)
        source, token = top // vocab, top % vocab  # [B, keep] each
        candidates = _gather(running, source).at[:, :, step].set(token)
        hits = jnp.broadcast_to(step + 1 >= max_new, token.shape)
        if eos_id is not None:
            hits = hits | (token == eos_id)

        # The best `width` continuations that go on.
        live_score = top_score + hits * NEVER
        _, chosen = jax.lax.top_k(live_score, width)
        running = _gather(candidates, chosen)
        running_score = _gather(live_score, chosen)
        parent = _gather(source, chosen)  # [B, width]: the beam each came from

        # Continuations that finished, among the top `width`, join the finished ones.
        just_done = hits & is_top[None, :]
        score = top_score / (step + 1.0) ** penalty
        full = jnp.all(finished, axis=-1, keepdims=True) & (beams.early_stopping is True)
        score = score + full * NEVER + (~improvable)[:, None] * NEVER + (~just_done) * NEVER
        merged_score = jnp.concatenate([done_score, score], axis=1)
        _, best = jax.lax.top_k(merged_score, width)
        done = _gather(jnp.concatenate([done, candidates], axis=1), best)
        done_score = _gather(merged_score, best)
        lengths = jnp.full((batch, keep), step + 1, jnp.int32)
        done_len = _gather(jnp.concatenate([done_len, lengths], axis=1), best)
        finished = _gather(jnp.concatenate([finished, just_done], axis=1), best)

        # Could a running beam still beat the worst finished one?
        step = step + 1
        if beams.early_stopping == "never" and penalty > 0.0:
            hypothetical = jnp.float32(max_new)
        else:
            hypothetical = step.astype(jnp.float32)
        best_possible = running_score[:, :1] / hypothetical**penalty
        worst = jnp.where(finished, jnp.min(done_score, axis=1, keepdims=True), NEVER)
        improvable = improvable & jnp.any(best_possible > worst, axis=-1)

        # Feed each running beam its new token; the caches follow their beams.
        rows = (jnp.arange(batch)[:, None] * width + parent).reshape(-1)
        decoding = decoding.take(rows)
        logits, decoding = model.step(running[:, :, step - 1].reshape(-1), decoding, step - 1)
        return (step, logits, decoding, running, running_score, done, done_score, done_len,
                finished, improvable, hits)  # fmt: skip

    carry = (0, logits, decoding, running, running_score, done, done_score, done_len,
             finished, improvable, hits)  # fmt: skip
    carry = jax.lax.while_loop(going, body, carry)
    return carry[5], carry[7], carry[6]

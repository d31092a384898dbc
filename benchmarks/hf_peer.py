"""The peer side of the throughput benchmark: the same model in HF transformers on torch.

``LlamaForCausalLM`` built from a ``LlamaConfig`` that mirrors jaxtrain's model config
(random init, no weights downloaded), eager attention, float32, ``torch.optim.AdamW``
with the same hyper-parameters and global-norm clipping as jaxtrain (as HF's Trainer
does), loss via ``labels=``. Run by ``benchmarks/throughput.py`` in its own process.
Prints one JSON object on the last line of stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from jaxtrain.config import Config, load

INSTALL_HINT = "pip install torch==2.13.0 transformers"


def llama_config(cfg: Config):
    """The ``LlamaConfig`` of jaxtrain's model section (untied unless the config ties)."""
    from transformers import LlamaConfig

    m = cfg.model
    return LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        intermediate_size=m.mlp_dim,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads,
        head_dim=m.head_dim,
        max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        tie_word_embeddings=m.tie_embeddings,
        attention_dropout=m.dropout,
        use_cache=False,
        attn_implementation="eager",
    )


def run(config: str, steps: int, warmup: int) -> dict:
    """Build the model and optimizer, time full train steps; return the measurements."""
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    cfg = load(config)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(cfg)).to(torch.float32).train()
    n_params = sum(p.numel() for p in model.parameters())
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )

    rows, seq_len = cfg.train.global_batch, cfg.data.seq_len
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, cfg.model.vocab_size, (rows, seq_len), generator=gen)
        for _ in range(warmup + steps)
    ]

    times, losses = [], []
    for i, tokens in enumerate(batches):
        start = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss  # shifts labels internally
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        print(f"hf step {i + 1}: {times[-1]:.3f}s loss {losses[-1]:.4f}", file=sys.stderr)

    return {
        "framework": "hf",
        "n_params": n_params,
        "tokens_per_step": rows * seq_len,
        "step_s": statistics.median(times[warmup:]),
        "step_times_s": times,
        "warmup": warmup,
        "losses": losses,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench-cpu.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(json.dumps({"framework": "hf", "skipped": f"{e}; install with: {INSTALL_HINT}"}))
        return
    print(json.dumps(run(args.config, args.steps, args.warmup)))


if __name__ == "__main__":
    main()

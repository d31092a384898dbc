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


def llama_config(cfg: Config, attention: str = "eager"):
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
        attn_implementation=attention,
    )


def run(
    config: str, steps: int, warmup: int, device: str = "cpu", overrides: tuple[str, ...] = ()
) -> dict:
    """Build the model and optimizer, time full train steps; return the measurements.

    On ``device="cuda"`` attention is PyTorch's fused SDPA, and a config that computes in
    bfloat16 (``model.compute_dtype``) runs under ``torch.autocast`` with float32 weights,
    jaxtrain's mixed precision.
    """
    import contextlib

    import torch
    import transformers
    from transformers import LlamaForCausalLM

    cfg = load(config, list(overrides))
    torch.manual_seed(0)
    attention = "sdpa" if device == "cuda" else "eager"
    model = LlamaForCausalLM(llama_config(cfg, attention)).to(torch.float32).to(device).train()
    autocast = contextlib.nullcontext()
    if cfg.model.compute_dtype == "bfloat16":
        autocast = torch.autocast(device, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )

    rows, seq_len = cfg.train.global_batch, cfg.data.seq_len
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, cfg.model.vocab_size, (rows, seq_len), generator=gen).to(device)
        for _ in range(warmup + steps)
    ]

    times, losses = [], []
    for i, tokens in enumerate(batches):
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=tokens, labels=tokens).loss  # shifts labels internally
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
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
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "attention": attention,
        "autocast": cfg.model.compute_dtype == "bfloat16",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/bench-cpu.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(json.dumps({"framework": "hf", "skipped": f"{e}; install with: {INSTALL_HINT}"}))
        return
    print(json.dumps(run(args.config, args.steps, args.warmup, args.device, tuple(args.set))))


if __name__ == "__main__":
    main()

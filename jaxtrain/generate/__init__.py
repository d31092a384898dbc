"""Text generation: KV-cache decoding, sampling and beam search."""

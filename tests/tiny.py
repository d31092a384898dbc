"""The tiny model the tests train: 2 layers, width 64, grouped-query attention."""

TINY = (
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.mlp_dim=128",
    "model.vocab_size=128",
    "data.seq_len=16",
    "train.global_batch=8",
)

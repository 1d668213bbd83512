"""Model code shared by node and client: the decoder block, per-family configs, KV cache, checkpoints."""

"""Per-family block adapters shared by node and client: config, decoder blocks, KV cache, checkpoints."""

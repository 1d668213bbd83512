"""The Llama family (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3): its config; the block is the shared one."""

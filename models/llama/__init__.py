"""The Llama family (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3 share this block with small switches)."""

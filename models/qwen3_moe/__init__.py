"""The Qwen3-MoE family: Qwen3's attention (q/k norms) with a softmax-routed mixture of SwiGLU experts."""

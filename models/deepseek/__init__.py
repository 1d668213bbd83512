"""The DeepSeek-V3 family: multi-head latent attention, shared + routed experts, dense first layers."""

"""Reference answers the tests compare with: plain transformers' greedy decoding, chat prompts, and the
greedy loop through one span of our own blocks (for spans tested without a node)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

STORY = "Write a long story about a dragon who learns to paint."
PROMPTS = (
    STORY,
    "What is the capital of France? Answer in two sentences.",
    "Explain how a bicycle works.",
    "Name three colours.",
)


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """The prompt as one user turn of the model's chat template, ready for the assistant's answer."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def hf_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' greedy continuation: the prompt and `n` new tokens (fewer if it ends)."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))


def local_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """`hf_greedy` of a one-row prompt as a list (prompt included); `model` may be a peft model."""
    return hf_greedy(model, ids, n)[0].tolist()


def new_greedy_tokens(path: Path | str, prompt: torch.Tensor, n: int) -> list[int]:
    """The `n` tokens transformers' float32 model at `path` adds to `prompt`, greedily."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf_greedy(hf, prompt, n)[0, prompt.shape[1] :].tolist()


def span_greedy(head, span, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Prefill, then one token per step with a KV cache, through one span of every block."""
    caches = span.new_caches(span.start, span.end, 1, ids.shape[1] + new_tokens)
    hidden = span(head.embed(ids), 0, span.start, span.end, caches)
    tokens, position = [], ids.shape[1]
    for _ in range(new_tokens):
        token = head.logits(hidden)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens.append(int(token))
        hidden = span(head.embed(token), position, span.start, span.end, caches)
        position += 1
    return tokens

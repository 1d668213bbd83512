"""Every family, split into spans in-process, against transformers running the same tiny checkpoint.

Prefill plus 32 greedy steps through chained spans with KV caches must give transformers' logits (to 1e-4)
at every position and `generate`'s tokens exactly; a prompt fed in chunks exercises the masked path
(several tokens at a position > 0, across the sliding window). No network, no node processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from tiny_models import FAMILIES_UNDER_TEST, SLIDING_WINDOW, save_tiny_model
from transformers import AutoModelForCausalLM

from torchnode.models.checkpoint import Checkpoint, resolve
from torchnode.models.families import FAMILIES, LAYER_PREFIX, load_head, load_span
from torchnode.models.llama.config import rope_inverse_frequencies

TOLERANCE = 1e-4
PROMPT_TOKENS, NEW_TOKENS, BATCH = 12, 32, 2


@dataclass
class Tiny:
    family: str
    ckpt: Checkpoint
    reference: torch.nn.Module  # transformers' own model, loaded from the same files

    @property
    def num_blocks(self) -> int:
        return self.ckpt.hf_config.num_hidden_layers


@pytest.fixture(scope="module", params=FAMILIES_UNDER_TEST)
def tiny(request, tmp_path_factory) -> Tiny:
    path = save_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return Tiny(request.param, resolve(str(path)), reference)


def prompt(batch: int = BATCH, tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    """Random non-special token ids (B, T), the same on every call."""
    return torch.randint(3, 259, (batch, tokens), generator=torch.Generator().manual_seed(1))


def splits(blocks: int) -> dict[str, list[tuple[int, int]]]:
    return {
        "uneven": [(0, 1), (1, 3), (3, blocks)],
        "one-block-spans": [(i, i + 1) for i in range(blocks)],
    }


class Chain:
    """Spans of one split run back to back, as a client drives the nodes that serve them."""

    def __init__(self, ckpt: Checkpoint, bounds: list[tuple[int, int]]):
        self.spans = [load_span(ckpt, start, end) for start, end in bounds]

    def new_caches(self, batch: int, max_length: int) -> list[list]:
        return [span.new_caches(span.start, span.end, batch, max_length) for span in self.spans]

    def __call__(self, x: torch.Tensor, position: int, caches: list[list]) -> torch.Tensor:
        for span, span_caches in zip(self.spans, caches, strict=True):
            x = span(x, position, span.start, span.end, span_caches)  # (B, T, hidden)
        return x


def greedy(head, chain: Chain, ids: torch.Tensor, new_tokens: int, eos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill, then one token per step; returns (new tokens (B, N), logits at every fed position (B, T+N-1, V)).

    The end-of-sequence ids are never chosen, as `generate(min_new_tokens=N)` does.
    """
    B, T = ids.shape
    caches = chain.new_caches(B, T + new_tokens)
    logits = [head.logits(chain(head.embed(ids), 0, caches))]  # (B, T, V)
    tokens, position = [], T
    for step in range(new_tokens):
        last = logits[-1][:, -1].clone()  # (B, V)
        last[:, eos] = float("-inf")
        tokens.append(last.argmax(-1, keepdim=True))  # (B, 1)
        if step == new_tokens - 1:
            break
        logits.append(head.logits(chain(head.embed(tokens[-1]), position, caches)))  # (B, 1, V)
        position += 1
    return torch.cat(tokens, dim=1), torch.cat(logits, dim=1)


def eos_ids(reference) -> list[int]:
    eos = reference.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@pytest.mark.parametrize("split", ["uneven", "one-block-spans"])
def test_greedy_decoding_matches_transformers(tiny: Tiny, split: str):
    head = load_head(tiny.ckpt)
    chain = Chain(tiny.ckpt, splits(tiny.num_blocks)[split])
    ids = prompt()
    tokens, logits = greedy(head, chain, ids, NEW_TOKENS, eos_ids(tiny.reference))

    with torch.inference_mode():
        out = tiny.reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            output_logits=True,
            return_dict_in_generate=True,
        )
        sequence = torch.cat([ids, tokens], dim=1)
        full = tiny.reference(sequence[:, :-1]).logits  # (B, T+N-1, V): one forward, no cache
    expected_tokens = out.sequences[:, PROMPT_TOKENS:]
    assert torch.equal(tokens, expected_tokens), f"{tiny.family} {split}: greedy tokens differ"
    diff = (logits - full).abs().max().item()
    assert diff <= TOLERANCE, f"{tiny.family} {split}: logits differ from a full forward by {diff:.2e}"
    stepwise = torch.stack(out.logits, dim=1)  # (B, N, V): generate's own cached steps
    diff = (logits[:, PROMPT_TOKENS - 1 :] - stepwise).abs().max().item()
    assert diff <= TOLERANCE, f"{tiny.family} {split}: logits differ from generate's by {diff:.2e}"


def test_chunked_prefill_matches_transformers(tiny: Tiny):
    """Several tokens at a position > 0 (the explicit mask), chunks crossing the sliding window."""
    head = load_head(tiny.ckpt)
    chain = Chain(tiny.ckpt, splits(tiny.num_blocks)["uneven"])
    chunks = (5, 6, 2 * SLIDING_WINDOW)
    ids = prompt(tokens=sum(chunks))
    caches = chain.new_caches(BATCH, ids.shape[1])
    logits, position = [], 0
    for size in chunks:
        logits.append(head.logits(chain(head.embed(ids[:, position : position + size]), position, caches)))
        position += size
    with torch.inference_mode():
        expected = tiny.reference(ids).logits  # (B, T, V)
    diff = (torch.cat(logits, dim=1) - expected).abs().max().item()
    assert diff <= TOLERANCE, f"{tiny.family}: chunked prefill logits differ by {diff:.2e}"


@dataclass(frozen=True)
class RecordingCheckpoint(Checkpoint):
    """A Checkpoint that remembers the names of the tensors it read."""

    read: list[str] = field(default_factory=list)

    def read_tensors(self, wanted, *args, **kwargs):
        tensors = super().read_tensors(wanted, *args, **kwargs)
        self.read.extend(tensors)
        return tensors


def test_spans_and_head_read_only_their_tensors(tiny: Tiny):
    everything = tiny.ckpt.read_tensors(lambda key: True)
    start, end = 1, 3
    ckpt = RecordingCheckpoint(tiny.ckpt.name, tiny.ckpt.path)
    span = load_span(ckpt, start, end)
    expected = {k for k in everything if k.startswith(tuple(f"{LAYER_PREFIX}{i}." for i in range(start, end)))}
    assert set(ckpt.read) == expected
    assert {k.split(".")[1] for k in span.state_dict()} == {str(i) for i in range(start, end)}

    ckpt.read.clear()
    load_head(ckpt)
    head_keys = {"model.embed_tokens.weight", "model.norm.weight"}
    if not tiny.ckpt.hf_config.tie_word_embeddings:
        head_keys.add("lm_head.weight")
    assert set(ckpt.read) == head_keys


def test_sliding_windows_per_layer(tiny: Tiny):
    windows = FAMILIES[tiny.family].from_hf(tiny.ckpt.hf_config).windows
    expected = {
        "mistral": (SLIDING_WINDOW,) * 5,
        "qwen2": (None, None, SLIDING_WINDOW, SLIDING_WINDOW),  # from max_window_layers = 2 on
    }.get(tiny.family, (None,) * tiny.num_blocks)
    assert windows == expected


def test_mixtral_loads_transformers_fused_experts(tmp_path):
    """A state dict in transformers' in-memory layout (3D `mlp.experts.gate_up_proj`) loads into the same span."""
    from torchnode.models.block import Span
    from torchnode.models.mixtral.config import MixtralConfig

    path = save_tiny_model("mixtral", tmp_path)
    ckpt = resolve(str(path))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fused = {k.removeprefix("model."): v for k, v in reference.state_dict().items() if k.startswith(LAYER_PREFIX)}
    assert "layers.0.mlp.experts.gate_up_proj" in fused
    span = Span(MixtralConfig.from_hf(ckpt.hf_config), 0, 4, *rope_inverse_frequencies(ckpt.hf_config))
    span.load_state_dict(fused, strict=True)
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(span(x, 0, 0, 4), load_span(ckpt, 0, 4)(x, 0, 0, 4))

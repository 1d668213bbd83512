"""Weights moved into transparent huge pages (models/huge_pages.py): the same values and outputs, tied weights
still one tensor, and the memory really in 2 MiB pages where this machine gives them."""

from __future__ import annotations

import pytest
import torch

from torchnode.models.families import load_span
from torchnode.models.huge_pages import available, move_into_huge_pages


def huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0


def test_a_span_computes_the_same_from_huge_pages(ckpt):
    span = load_span(ckpt, 0, 2)
    x = torch.randn(2, 5, span.config.hidden_size, generator=torch.Generator().manual_seed(0))
    before = span(x, 0, 0, 2)
    values = {name: t.clone() for name, t in span.state_dict().items()}
    moved = move_into_huge_pages(span)
    if not available():
        assert moved == 0
        pytest.skip("this machine gives no transparent huge pages: nothing moved")
    assert moved >= sum(t.numel() * t.element_size() for t in values.values())
    assert all(torch.equal(values[name], t) for name, t in span.state_dict().items())
    assert torch.equal(span(x, 0, 0, 2), before)


def test_tied_weights_stay_one_tensor_and_land_in_huge_pages():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(2048, 512), torch.nn.Linear(512, 2048, bias=False))
    model[1].weight = model[0].weight  # tied, as an LM head and its embeddings
    weight = model[0].weight
    moved = move_into_huge_pages(model)
    if not available():
        pytest.skip("this machine gives no transparent huge pages")
    assert moved == 2048 * 512 * 4  # once, not twice
    assert model[1].weight is weight and model[0].weight.data_ptr() == model[1].weight.data_ptr()
    assert huge_bytes_at(weight.data_ptr()) >= 2 * 2**20  # 4 MiB of weights: at least one whole 2 MiB page

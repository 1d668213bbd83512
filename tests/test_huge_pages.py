"""Weights moved into transparent huge pages (models/huge_pages.py): the same values and outputs, tied weights
still one tensor, and the memory really in 2 MiB pages where this machine gives them."""

from __future__ import annotations

import pytest
import torch
from fresh_python import run_code

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


PEAK_AFTER_HEAP_TENSORS = """
import torch
from torch import nn
from torchnode.models.huge_pages import move_into_huge_pages

def peak():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

scratch = torch.ones(7 * 2**20)  # 28 MiB freed: glibc's heap now serves anything up to 28 MiB, as after loading
del scratch
module = nn.Module()
for i in range(20):
    module.register_parameter(f"w{i}", nn.Parameter(torch.ones(3 * 2**20)))  # 12 MiB each, from the heap
before = peak()
assert move_into_huge_pages(module) > 0
print((peak() - before) // 2**20)
"""


def test_moving_raises_the_peak_by_about_one_tensor_not_the_whole_old_copy():
    """Weights that glibc put in its heap (under a raised mmap threshold) go back to the system one by one
    as they move: without that, the old copies (240 MiB here) stayed resident while the mapping filled."""
    if not available():  # Linux only
        pytest.skip("this machine gives no transparent huge pages")
    out = run_code(PEAK_AFTER_HEAP_TENSORS, check=False)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 64  # MiB: one 12 MiB tensor and a huge page or two, not 240

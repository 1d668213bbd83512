"""A CPU span's weights in transparent huge pages (2 MiB), not 4 KiB ones.

A decode step streams every weight of the span from memory. In 4 KiB pages a 15-block SmolLM2 span
(212 MB) is ~52,000 pages, each a TLB miss and a page-table walk, and on a node that idles while the
other nodes and the client compute, those walks go to memory too: measured here, a batch-8 step of such
a span took 23.4-23.7 ms after 50 ms idle in 4 KiB pages and 22.0-22.7 ms in huge pages (back to back,
no idle: the same). Linux gives huge pages only to anonymous private memory that asks for them
(`MADV_HUGEPAGE`, where /sys/kernel/mm/transparent_hugepage/enabled says `madvise`) and is 2 MiB aligned,
which torch's allocator does not do; so the weights move, one tensor at a time, into one mapping that
does (the peak is the span plus one tensor). Elsewhere (not Linux, THP off, another device) nothing moves.

Each old copy is handed back to the system as soon as it is freed (glibc's `malloc_trim`). Why: glibc
keeps freed chunks below its mmap threshold in its heap, and that threshold rises to the size of the
largest block freed so far (up to 32 MiB), as loading does; a Llama-3.2-3B span of 8 blocks kept its
12.6 MB k/v projections resident while the mapping filled, and moving raised the node's peak RSS by
254 MB (3.49 -> 3.74 GB, against its --max-memory). Trimmed after each tensor, the peak stays the loaded
span's. Handing the pages back costs time whatever the number of trims (a SmolLM2 span's move 0.13 ->
0.46 s, a 3B span's 4.2 -> 5.1 s; trimming once per 32 MiB cost the same and let the peak rise 39 MB).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 * 1024 * 1024
ALIGN = 64  # each tensor's start in the mapping: a cache line
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _malloc_trim():
    """glibc's malloc_trim, from the C library this process already runs on (no search for one), or None
    where it has none (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def available() -> bool:
    """Whether this machine gives huge pages to memory that asks (Linux, THP `madvise` or `always`)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[never]" not in setting


def move_into_huge_pages(module: nn.Module) -> int:
    """Moves the module's CPU parameters and buffers (each once, however often it is registered: tied
    weights stay tied) into one huge-page mapping, kept alive by the tensors that view it; returns the bytes
    moved (0: nothing to move, or huge pages unavailable). Values are unchanged."""
    if not available():
        return 0
    unique: dict[int, torch.Tensor] = {}  # id -> tensor: a tied weight is registered twice, moved once
    for sub in module.modules():
        for t in (*sub._parameters.values(), *sub._buffers.values()):
            if t is not None and t.device.type == "cpu" and t.is_contiguous() and t.numel() > 0:
                unique.setdefault(id(t), t)
    if not unique:
        return 0
    sizes = {key: -(-t.numel() * t.element_size() // ALIGN) * ALIGN for key, t in unique.items()}
    total = sum(sizes.values())
    mapping = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    memory = torch.frombuffer(mapping, dtype=torch.uint8)  # holds `mapping` for as long as a view lives
    offset = -memory.data_ptr() % HUGE_PAGE
    trim = _malloc_trim()
    for key, t in unique.items():
        nbytes = t.numel() * t.element_size()
        moved = memory[offset : offset + nbytes].view(t.dtype).view(t.shape)
        moved.copy_(t)
        t.data = moved  # the same Parameter / tensor object everywhere it is registered; its old memory is freed
        if trim is not None:
            trim(0)  # ... and back with the system now, not when glibc's heap next shrinks
        offset += sizes[key]
    return total

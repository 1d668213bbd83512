"""Each thread's torch pool size (models/torch_threads.py) stays what that thread set, whatever other threads
set later: torch hands a thread its count lazily, from the count set last anywhere, and that must not undo
a count set earlier (the SDK's loop thread asked for 1 and computed with 2)."""

from __future__ import annotations

import pytest
from fresh_python import run_code

# In a fresh interpreter (torch's per-thread state starts clean): `setup` runs on a new thread, then another
# thread enters with 2 threads, then the first thread runs a parallel op and reports its count.
PROBE = """
import threading, torch
from torchnode.models import torch_threads
torch_threads.set_threads(2)
set_up, other_done, counts = threading.Event(), threading.Event(), []
def first():
    torch_threads.{setup}()
    set_up.set()
    other_done.wait()
    (torch.ones(256, 256) @ torch.ones(256, 256)).sum()
    counts.append(torch.get_num_threads())
t = threading.Thread(target=first)
t.start()
set_up.wait()
torch_threads.set_threads({other})
other = threading.Thread(target=torch_threads.enter)
other.start()
other.join()
other_done.set()
t.join()
print(counts[0])
"""


@pytest.mark.parametrize(("setup", "other", "kept"), [("keep_thread_light", 2, 1), ("enter", 1, 2)])
def test_a_threads_count_outlives_a_count_set_later_in_another_thread(setup, other, kept):
    out = run_code(PROBE.format(setup=setup, other=other))
    assert int(out.stdout.split()[-1]) == kept

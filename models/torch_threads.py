"""Which OS threads run torch's parallel CPU work, and with how many threads each.

torch's CPU kernels parallelize with OpenMP (libgomp), whose thread pools belong to the OS thread that
starts a parallel region: every thread that ever ran a big enough op keeps a pool of its own for as long
as it lives. Once the pools of a process hold more threads than the machine has CPUs, libgomp makes every
pool's workers go to sleep almost at once between regions instead of spinning, and a decode step, hundreds
of short regions, runs about half as fast: a 15-block SmolLM2 span at batch 16 on 2 cores took 33 ms a
step with one pool and 60 ms once the thread that had loaded the weights (an executor thread, alive after)
kept a second one. So a process keeps one long-lived thread for its steady compute (a node's runner, a
client's head passes), one-off work (loading weights) runs on a thread that exits and frees its pool, and
each of those threads sets its pool's size itself: torch hands a new thread whatever count was set last.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

DEFAULT_THREADS = torch.get_num_threads()  # torch's own default (the CPUs), read before anything changes it
_threads = DEFAULT_THREADS


def set_threads(threads: int) -> None:
    """The pool size of every compute thread from now on (`--threads`; 0: torch's default)."""
    global _threads
    _threads = threads or DEFAULT_THREADS


def _set_own_count(threads: int) -> None:
    """The calling thread's pool size, kept. torch gives each thread its count lazily, at its first parallel op
    or count query, from the count set last in *any* thread; a count set before that is overwritten then. (The
    SDK's loop thread set 1 and then ran with 2, the count the weight-loading thread set meanwhile.) So the
    lazy step is taken first."""
    torch.get_num_threads()
    torch.set_num_threads(threads)


def enter() -> None:
    """First call on a compute thread: its pool gets the process's thread count."""
    _set_own_count(_threads)


def keep_thread_light() -> None:
    """The calling thread (a node's event loop) runs its torch ops on itself alone and never makes a pool,
    however large a prompt it decodes or checks."""
    _set_own_count(1)


async def in_passing_thread(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) on a new thread that exits afterwards, taking its OpenMP pool with it."""
    future: Future[T] = Future()

    def run() -> None:
        enter()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # handed to the awaiting task, whatever it is
            future.set_exception(e)

    threading.Thread(target=run, name="torchnode-passing", daemon=True).start()
    return await asyncio.wrap_future(future)


# The process's one long-lived compute thread for work off an event loop (a client's local span for --verify);
# its thread starts with its first task.
COMPUTE = ThreadPoolExecutor(1, thread_name_prefix="torchnode-compute", initializer=enter)


async def on_compute_thread(fn: Callable[..., T], *args: object) -> T:
    """fn(*args) on the process's compute thread (COMPUTE), awaited from an event loop."""
    return await asyncio.get_running_loop().run_in_executor(COMPUTE, fn, *args)

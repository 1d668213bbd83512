"""Where a span or a head computes: `--device auto|cpu|cuda[:N]|mps`, its default dtype and its free memory.

The node and the client hold CPU tensors everywhere else (the wire, the session's kept inputs, sampling);
only the module's own work happens on the device. `OnDevice` is that boundary: it moves tensor arguments
to the device, runs the module (and any method of it) with the device as torch's default, so the KV caches
a span allocates land there too, and hands tensor results back on the CPU. Copying a result to the CPU
also waits for the device, so a caller's clock (throughput measurement) times the device's real work.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when present, else MPS, else the CPU. A device that is not there is a clear ValueError."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; expected {DEVICE_CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise ValueError("device 'mps' asked for, but MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; expected {DEVICE_CHOICES}")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU (exact, and the fast path of the CPU kernels); bfloat16 on a GPU that has it
    (half the memory and bandwidth, the range of float32), float16 where it does not (pre-Ampere CUDA; MPS,
    whose bfloat16 depends on the macOS version)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def free_memory(device: torch.device) -> int:
    """Bytes a node may use on `device` when --max-memory is not given: the GPU's free memory now, or half the
    machine's RAM on the CPU (the rest is the OS's and other programs'). MPS shares the RAM: the CPU's answer."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on `device` (a no-op on the CPU), so a timer measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


class OnDevice:
    """A module on a device behind a CPU-tensor interface: calls and method calls move tensor arguments
    there (in nested lists, tuples and dicts too) and tensor results back to the CPU; anything the module
    allocates while running (KV caches) is allocated on the device. Other attributes read through."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "device", device)

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        args, kwargs = tree_map(lambda v: _to(v, self.device), (args, kwargs))
        with torch.device(self.device):
            result = fn(*args, **kwargs)
        return tree_map(lambda v: _to(v, torch.device("cpu")), result)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.module, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.module, name)
        if callable(value) and not isinstance(value, (torch.nn.Module, type)):
            return lambda *args, **kwargs: self._run(value, args, kwargs)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.module, name, value)


def place(module: torch.nn.Module, device: torch.device) -> Any:
    """`module` as is on the CPU (no wrapper, no copies: the common case stays as fast as before), or
    wrapped in `OnDevice` elsewhere. The module must already sit on `device`."""
    return module if device.type == "cpu" else OnDevice(module, device)

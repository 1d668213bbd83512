"""The safetensors format, read and written without a memory map: a node reads only its span's tensors,
each into a buffer of its own, and a conversion writes one tensor at a time (models/checkpoint.py,
models/gguf_convert.py, models/gguf_q4.py, models/lora.py, client/finetune.py)."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

SINGLE_SHARD = "model.safetensors"

# safetensors' dtype names (the format's header) and torch's
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

Wanted = Callable[[str], bool]


def safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """({name: {dtype, shape, data_offsets}}, where the data starts) from the file's JSON header alone."""
    header, start = _header(path)
    header.pop("__metadata__", None)
    return header, start


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The file's own string map (`__metadata__`), from its header alone."""
    return _header(path)[0].get("__metadata__", {})


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def read_safetensors(path: Path, wanted: Wanted) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor of the file whose name satisfies `wanted`, each read into a fresh
    buffer of its own with one file read: nothing else of the file is read, mapped or kept."""
    header, data_start = safetensors_header(path)
    with open(path, "rb", buffering=0) as f:
        for name, entry in header.items():
            if not wanted(name):
                continue
            begin, end = entry["data_offsets"]
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(data_start + begin)
            if f.readinto(memoryview(buffer.numpy())) != end - begin:
                raise ValueError(f"{path} is truncated: tensor {name} ends past the end of the file")
            yield name, buffer.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """Writes (name, tensor) pairs as one safetensors file, holding one tensor in memory at a time.

    The header (names, shapes, offsets) comes first in the format but is known only at the end, so the
    data goes to a side file as the tensors arrive, and is then copied behind the header in fixed-size
    chunks. (safetensors' own `save_file` needs every tensor in memory at once.)
    """
    header: dict[str, dict] = {"__metadata__": metadata}
    data_path = path.with_suffix(".data")
    offset = 0
    with open(data_path, "wb") as data:
        for name, tensor in tensors:
            raw = tensor.contiguous().view(-1).view(torch.uint8).numpy() if tensor.numel() else b""
            data.write(raw)
            size = tensor.numel() * tensor.element_size()
            header[name] = {
                "dtype": TORCH_TO_SAFETENSORS[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as out, open(data_path, "rb") as data:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        shutil.copyfileobj(data, out, 16 << 20)
    data_path.unlink()

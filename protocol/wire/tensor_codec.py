"""Tensors on the wire as (dtype name, shape, raw bytes).

Decoding validates everything a peer could get wrong (unknown dtype, byte count that does not match the
shape, negative or absurd dimensions) and raises `TensorFormatError`, which servicers map onto
INVALID_ARGUMENT: a malformed tensor must never reach torch.
"""

from __future__ import annotations

import math

import torch

from . import torchnode_pb2 as pb

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 40  # far above any message gRPC carries; also bounds shapes with a zero dimension


class TensorFormatError(ValueError):
    """A tensor message that cannot be decoded."""


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise TensorFormatError(f"unsupported dtype {name!r}; expected one of {sorted(WIRE_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> pb.Tensor:
    """Serializes `tensor`, cast to `dtype` first if given (e.g. float32 compute -> bfloat16 wire)."""
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    name = dtype_name(tensor.dtype)
    if name not in WIRE_DTYPES:
        raise TensorFormatError(f"cannot send dtype {name}")
    flat = tensor.detach().contiguous().reshape(-1)
    # bf16 has no numpy twin: ship its bits as int16, which has the same layout.
    raw = flat.view(torch.int16) if tensor.dtype == torch.bfloat16 else flat
    return pb.Tensor(dtype=name, shape=list(tensor.shape), data=raw.numpy().tobytes())


def decode(message: pb.Tensor) -> torch.Tensor:
    """Deserializes a tensor, checking the byte count against dtype and shape."""
    dtype = dtype_from_name(message.dtype)
    shape = tuple(message.shape)
    if not shape or len(shape) > MAX_DIMS:
        raise TensorFormatError(f"tensor must have 1..{MAX_DIMS} dimensions, got shape {list(shape)}")
    if any(d < 0 for d in shape):
        raise TensorFormatError(f"negative dimension in shape {list(shape)}")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:  # (0, 2**62, 2**62) would overflow torch's strides
        raise TensorFormatError(f"absurd shape {list(shape)}: more than {MAX_ELEMENTS} elements")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if expected != len(message.data):
        raise TensorFormatError(
            f"tensor of dtype {message.dtype} and shape {list(shape)} needs {expected} bytes, got {len(message.data)}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    storage_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
    flat = torch.frombuffer(bytearray(message.data), dtype=storage_dtype)
    return flat.view(dtype).reshape(shape)


def to_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor as the bytes of its wire message, to keep beside signed messages (a fraud proof's pushed inputs)."""
    return encode(tensor).SerializeToString()


def from_bytes(data: bytes) -> torch.Tensor:
    """The inverse of `to_bytes`, checked as `decode` checks a tensor from the wire."""
    try:
        message = pb.Tensor.FromString(data)
    except Exception as e:  # protobuf's DecodeError and friends: not a tensor message
        raise TensorFormatError(f"not a tensor message: {e}") from None
    return decode(message)

"""The raw Q4_0/Q4_1 blocks of a GGUF checkpoint, kept beside its dequantized safetensors cache, so that a
node serving `--quant int4` uses the file's own 4-bit codes (`Int4Linear.from_gguf`) instead of widening
them to float and rounding them again.

`gguf_convert.gguf_to_safetensors` writes them once, after the float weights, into `GGUF_Q4_BLOCKS` in the
same cache directory (a subfolder, so no reader of the float shards ever sees it): a safetensors file of
uint8 tensors, one row of blocks per output row, keyed by the transformers name, each weight's GGUF type
in the file's metadata. Weights of any other type (Q8_0 embeddings, Q6_K, F16) have no entry, and an int4
node re-quantizes those from the floats. A cache made before this file existed gets it on its next use.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from transformers import PretrainedConfig

from .gguf_read import gguf_names, read_gguf_data
from .safetensors_files import Wanted, read_safetensors, write_safetensors

GGUF_Q4_BLOCKS = "gguf-q4/model.safetensors"  # in a subfolder: never taken for a shard of the float weights
GGUF_Q4_TYPES = ("Q4_0", "Q4_1")


def write_gguf_q4_blocks(gguf: Path, config: PretrainedConfig, path: Path) -> None:
    """Writes the raw blocks of each 2-D Q4_0/Q4_1 weight of `gguf` (uint8, one row of blocks per output, in
    the row order of the float weights) under its transformers name, its GGUF type in the metadata.

    Blocks run along a row, so transformers' processors, which permute rows (Llama's q/k), permute the block
    rows alike: the permutation is found by processing the row indices; a weight whose processing is not a
    row permutation (fused experts) is left out, and re-quantized where it is served in int4."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    processor, names = gguf_names(reader, config)
    kept: list[tuple[str, object, np.ndarray]] = []
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in GGUF_Q4_TYPES or tensor.data.ndim != 2:
            continue
        rows = tensor.data.shape[0]
        index = np.arange(rows, dtype=np.float32)[:, None]  # (out, 1): where each output row comes from
        probe = processor.process(
            weights=index, name=tensor.name, tensor_key_mapping=names, parsed_parameters={"tensors": {}}
        )  # fmt: skip
        order = np.asarray(probe.weights).reshape(-1).astype(np.int64)
        is_permutation = order.shape == (rows,) and np.array_equal(np.sort(order), np.arange(rows))
        if probe.name not in names or not is_permutation:
            continue
        if names[probe.name] == "lm_head.weight" and config.tie_word_embeddings:
            continue
        kept.append((names[probe.name], tensor, order))
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "gguf-q4", **{name: tensor.tensor_type.name for name, tensor, _ in kept}}
    tmp = path.with_suffix(".tmp")  # complete or absent: the file's presence says it is done
    with open(gguf, "rb", buffering=0) as file:
        write_safetensors(tmp, ((n, torch.from_numpy(read_gguf_data(file, t)[o])) for n, t, o in kept), metadata)
    tmp.replace(path)


def read_gguf_q4_blocks(
    path: Path, wanted: Wanted, device: torch.device | str = "cpu"
) -> dict[str, tuple[str, torch.Tensor]]:
    """{transformers name: (GGUF type, uint8 block rows)} of the wanted weights kept as Q4 blocks in the
    checkpoint directory `path`; empty for a checkpoint that does not come from a GGUF file."""
    file = path / GGUF_Q4_BLOCKS
    if not file.exists():
        return {}
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        types = json.loads(f.read(size))["__metadata__"]
    return {name: (types[name], blocks.to(device)) for name, blocks in read_safetensors(file, wanted)}

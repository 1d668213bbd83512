"""Reading a GGUF file for a conversion: transformers' map from GGUF tensor names to its own (and the
per-architecture processor that goes with it), and a tensor's data read with plain file reads."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig


def gguf_names(reader, config: PretrainedConfig):
    """transformers' tensor processor for the file's architecture and its {GGUF name: transformers name}.
    Drops the reader's metadata fields, which a conversion never needs (AutoConfig and AutoTokenizer read
    their own): SmolLM2's vocabulary and merges are ~90 MiB of small arrays, a third of the peak."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    architecture = read_field(reader, "general.architecture")[0]
    reader.fields.clear()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())  # head counts
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return processor, get_gguf_hf_weights_map(skeleton, processor)


def read_gguf_data(file, tensor):
    """`tensor.data` (gguf's ReaderTensor) read with one plain file read into a fresh array, not through the
    reader's memory map: each page of the map that a conversion touches stays in the process's resident
    memory until the map is gone, so reading the weights through it adds the whole file to the peak."""
    import numpy as np

    out = np.empty(tensor.data.shape, dtype=tensor.data.dtype)
    file.seek(tensor.data_offset)
    if file.readinto(memoryview(out).cast("B")) != out.nbytes:
        raise ValueError(f"{file.name} is truncated: tensor {tensor.name} ends past the end of the file")
    return out

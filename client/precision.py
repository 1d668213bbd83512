"""What a node computes in (its Info's `dtype` and `quant`), and which computations can judge each other.

A public swarm mixes float32 CPUs, bfloat16 GPUs and nodes with 8- or 4-bit weights (`join --quant`). They
do not compute the same function: int8 weights move a span's outputs by far more than any rounding of the
activations (scripts/bench_precision.py), so a verifier (client/verification/verifier.py) compares like with
like. Two computations are `comparable` when their weights are the same (the same quantization: "none",
"int8", "int4", "nf4"); the dtypes may differ, and the tolerance then follows the coarsest of them. An
int8 node is judged by another int8 node or by the client recomputing its blocks in int8
(models/quantization.py quantizes a checkpoint the same way wherever it runs), never by a float32 one.

`fp32_only` routing (`--fp32-only`): a client that wants the float32 model's exact output uses only nodes
whose `exact` is true (float32, unquantized).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXACT_DTYPE = "float32"
NO_QUANT = "none"
EPS_FACTOR = 32  # tolerance = EPS_FACTOR * machine epsilon of the coarsest dtype involved + FLOOR
FLOOR = 1e-4  # float32 prefill vs decode differ by up to ~5e-6 (relative) on SmolLM2's 15 blocks
# The CPU kernels for int8 and int4 weights take bfloat16 activations (models/quantization.py): a quantized
# span rounds every linear's input to bfloat16 whatever its dtype, so its tolerance is bfloat16's at least.
KERNEL_DTYPE = torch.bfloat16
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A span's compute dtype ("float32", "bfloat16", "float16") and weight quantization ("none", "int8", ...)."""

    dtype: str = EXACT_DTYPE
    quant: str = NO_QUANT

    @classmethod
    def of(cls, info) -> Precision:
        """A node's precision from its Info (`NodeInfo`); a node too old to say its quantization says "" (none)."""
        return cls(info.dtype or EXACT_DTYPE, getattr(info, "quant", "") or NO_QUANT)

    @property
    def exact(self) -> bool:
        """float32 with unquantized weights: what `--fp32-only` routes through."""
        return self.dtype == EXACT_DTYPE and self.quant == NO_QUANT

    @property
    def torch_dtype(self) -> torch.dtype:
        """The compute dtype; an unknown name counts as bfloat16 (the loosest we accept, never a false accusation)."""
        return _DTYPES.get(self.dtype, torch.bfloat16)

    @property
    def rounding_dtype(self) -> torch.dtype:
        """The coarsest dtype the span's arithmetic rounds to: its dtype, or the quantized kernels' bfloat16."""
        if self.quant == NO_QUANT:
            return self.torch_dtype
        return max(self.torch_dtype, KERNEL_DTYPE, key=lambda d: torch.finfo(d).eps)

    @property
    def name(self) -> str:
        return self.dtype if self.quant == NO_QUANT else f"{self.dtype}+{self.quant}"

    def comparable(self, other: Precision) -> bool:
        """Whether honest runs of the two agree within a rounding tolerance: the same weights."""
        return self.quant == other.quant


EXACT = Precision()


def dtype_tolerance(*dtypes: torch.dtype) -> float:
    """Largest relative error (verifier.first_mismatch) honest computations in these dtypes can show."""
    return EPS_FACTOR * max(torch.finfo(d).eps for d in dtypes) + FLOOR


def tolerance(*precisions: Precision, wire: torch.dtype = torch.float32) -> float | None:
    """The tolerance between runs of these precisions (sent over `wire`); None when they are not comparable."""
    if any(not precisions[0].comparable(p) for p in precisions[1:]):
        return None
    return dtype_tolerance(wire, *(p.rounding_dtype for p in precisions))

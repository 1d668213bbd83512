"""torchnode: run large language models across volunteer machines.

The SDK's public names are imported lazily, so `torchnode --help` and node start-up stay fast.
"""

__version__ = "0.1.0"
__all__ = ["AsyncDistributedModel", "DistributedModel", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name in ("AsyncDistributedModel", "DistributedModel"):
        from .client import model

        return getattr(model, name)
    if name == "SamplingParams":
        from .client.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'torchnode' has no attribute {name!r}")

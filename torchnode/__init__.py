"""torchnode: run large language models across volunteer machines.

The SDK's public names are imported lazily, so `torchnode --help` and node start-up stay fast. Importing the
package sets how long idle OpenMP threads spin (torchnode/openmp_env.py) unless torch is already loaded,
and gRPC's TCP transport (torchnode/grpc_env.py) unless grpc is.
"""

from . import grpc_env, openmp_env  # noqa: F401  (first: their environments, before anything loads grpc or torch)
from .protocol.version import __version__

__all__ = [
    "AsyncDistributedModel",
    "ClientConfig",
    "DistributedModel",
    "GenerationOptions",
    "SamplingParams",
    "__version__",
]


def __getattr__(name: str):
    if name == "AsyncDistributedModel":
        from .client.model import AsyncDistributedModel

        return AsyncDistributedModel
    if name == "DistributedModel":
        from .client.sync_model import DistributedModel

        return DistributedModel
    if name in ("ClientConfig", "GenerationOptions"):
        from .client import config

        return getattr(config, name)
    if name == "SamplingParams":
        from .client.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'torchnode' has no attribute {name!r}")

"""torchnode: run large language models across volunteer machines."""

__version__ = "0.1.0"

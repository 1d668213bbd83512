"""The OpenAI-compatible HTTP API over the swarm (import name `torchnode.api`; needs the `api` extra).

schema.py: request and response bodies. errors.py: OpenAI's error bodies. jobs.py: generation per
prompt. handlers.py: the endpoints' logic (OpenAIServer). app.py: `create_app(model, served_name)`.
runner.py: `run_api(...)`, the `torchnode api` command.
"""

from .app import create_app
from .runner import run_api

__all__ = ["create_app", "run_api"]

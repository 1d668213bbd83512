"""gRPC's TCP transport (torchnode/grpc_env.py): chosen by `import torchnode` in a process of its own, never
over what the user set, and made of experiment names this gRPC knows (an unknown one is logged and ignored)."""

from __future__ import annotations

import subprocess

from fresh_python import run_code

from torchnode import grpc_env

# A channel makes the core read GRPC_EXPERIMENTS; it complains there about names it does not know.
SHOW = (
    "import os, torchnode, grpc; grpc.insecure_channel('127.0.0.1:9').close(); "
    "print(os.environ.get('GRPC_EXPERIMENTS'))"
)


def run_show(**env: str) -> subprocess.CompletedProcess:
    return run_code(SHOW, drop=("GRPC_EXPERIMENTS",), **env)


def test_importing_torchnode_chooses_the_transport_with_names_grpc_knows():
    out = run_show()
    assert out.stdout.split() == [grpc_env.EXPERIMENTS]
    assert "Unknown experiment" not in out.stderr


def test_what_the_user_set_wins():
    assert run_show(GRPC_EXPERIMENTS="event_engine_client").stdout.split() == ["event_engine_client"]


def test_an_unknown_name_would_be_noticed():
    """The check above can fail: gRPC does name an experiment it does not know."""
    assert "Unknown experiment" in run_show(GRPC_EXPERIMENTS="-no_such_experiment").stderr

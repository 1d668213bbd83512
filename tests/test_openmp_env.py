"""How long idle OpenMP threads spin (torchnode/openmp_env.py): set by `import torchnode` in a process of
its own, never over what the user set, and undone for a process that must run as plain torch would."""

from __future__ import annotations

import pytest
from fresh_python import run_code

from torchnode import openmp_env

SHOW = (
    "import os, torchnode; from torchnode import openmp_env; "
    "print(os.environ.get('GOMP_SPINCOUNT'), openmp_env.libgomp_default_env().get('GOMP_SPINCOUNT'))"
)


def spin_counts(**env: str) -> list[str]:
    """(GOMP_SPINCOUNT after `import torchnode`, the one libgomp_default_env gives) in a fresh interpreter."""
    return run_code(SHOW, drop=("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"), **env).stdout.split()


def test_importing_torchnode_sets_the_spin_count_and_the_reference_gets_libgomps_own():
    assert spin_counts() == [openmp_env.SPIN_COUNT, openmp_env.LIBGOMP_SPIN_COUNT]
    assert int(openmp_env.SPIN_COUNT) < int(openmp_env.LIBGOMP_SPIN_COUNT)


@pytest.mark.parametrize("env", [{"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "passive"}])
def test_what_the_user_set_wins(env):
    expected = env.get("GOMP_SPINCOUNT", "None")
    assert spin_counts(**env) == [expected, expected]

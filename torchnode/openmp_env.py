"""How long idle OpenMP threads spin before they sleep, set when the package is imported (before torch loads).

libgomp's workers spin for GOMP_SPINCOUNT iterations (300,000 by default, milliseconds) after each parallel
region before they sleep. Within a step that keeps them ready for the next region, a few microseconds
away; after a node's step it keeps them burning the cores the next node of the chain, or the client's head
pass, needs now, when several run on one machine (2 nodes and a client on 2 cores: SmolLM2 loopback decode
19.7 -> 21.9 tokens/s with 10,000). 10,000 iterations still bridge the gaps inside a step (a 15-block span at
batch 16: 36 ms a step, as with the default). A GOMP_SPINCOUNT (or OMP_WAIT_POLICY) the user set wins, and a
process that loaded torch before it imported torchnode keeps libgomp's default.
"""

from __future__ import annotations

import os

SPIN_COUNT = "10000"
LIBGOMP_SPIN_COUNT = "300000"  # libgomp's own default

set_here = "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ
if set_here:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def libgomp_default_env() -> dict[str, str]:
    """This process's environment as the user gave it: for a process that must run as plain torch would (a
    benchmark's transformers reference), whatever torchnode imports first."""
    return os.environ | ({"GOMP_SPINCOUNT": LIBGOMP_SPIN_COUNT} if set_here else {})

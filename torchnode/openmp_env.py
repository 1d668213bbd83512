"""How long idle OpenMP threads spin before they sleep, set when the package is imported (before torch loads).

libgomp's workers spin for GOMP_SPINCOUNT iterations (300,000 by default, about a millisecond here) after
each parallel region before they sleep. Within a step that keeps them ready for the next region, a few
microseconds away; after a node's step it keeps them burning the cores the next node of the chain, or the
client's head pass, needs now, when several run on one machine (2 nodes and a client on 2 cores). Too short,
though, and they fall asleep in the gaps *inside* a step (the attention, norms and Python between two
linears) and each region pays for waking them. 20,000 iterations (~70 us on this machine's CPUs) is where
the two meet, measured on SmolLM2 over 2 loopback nodes: decode against transformers 0.91-0.93 with 10,000,
0.94-0.97 with 20,000 (0.93-0.97 with 30,000, 0.92 with 50,000, 0.90-0.91 with 100,000; 3,000 or fewer:
0.57-0.66); 8 batched sessions 106-109 -> 109-115 tokens/s. A GOMP_SPINCOUNT (or OMP_WAIT_POLICY) the
user set wins, and a process that loaded torch before it imported torchnode keeps libgomp's default.
"""

from __future__ import annotations

import os

SPIN_COUNT = "20000"
LIBGOMP_SPIN_COUNT = "300000"  # libgomp's own default

set_here = "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ
if set_here:
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def libgomp_default_env() -> dict[str, str]:
    """This process's environment as the user gave it: for a process that must run as plain torch would (a
    benchmark's transformers reference), whatever torchnode imports first."""
    return os.environ | ({"GOMP_SPINCOUNT": LIBGOMP_SPIN_COUNT} if set_here else {})

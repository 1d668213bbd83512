"""Which transport gRPC's C core uses for TCP, set when the package is imported (before grpc loads).

Since about 1.60 gRPC moves a connection's bytes through its EventEngine: a write or a read is handed to the
engine's own threads, which then hand the result back to the thread that asked. Every such
hand-off wakes a thread, on an idle machine a sleeping CPU too, and a decode step crosses the wire four
times a token (client -> node -> client -> node -> client). The core's older TCP path (iomgr, still built in
and chosen with the `event_engine_client` and `event_engine_listener` experiments off) reads and writes on
the calling thread. Measured here (grpcio 1.85, 2 cores): a 2.4 KB message's round trip on a grpc.aio
stream 234-271 -> 107-144 us (TLS or not); a 4-block tiny model over 2 loopback nodes, where the CPUs idle
between the short steps as a GPU node's do (scripts/bench_overhead.py --model tiny --runs 5, 2 pairs),
125-127 -> 144-153 tokens/s, 3.2-3.3 -> 2.5-2.7 ms per hop per token. Where the steps keep the CPUs
busy it changes nothing measurable: SmolLM2 on CPU nodes against transformers (scripts/bench_overhead.py
--runs 5, 5 pairs) 0.979 / 0.980 / 0.962 / 0.970 / 0.968 with it, 0.982 / 0.964 / 0.977 / 0.960 / 0.964
without, and a traced token's hand-offs are the same (5.5 ms).

A GRPC_EXPERIMENTS the user set wins, and a process that imported grpc before torchnode keeps gRPC's
default (the core reads the variable when it loads). A gRPC that no longer has these experiments logs
"Unknown experiment" once and runs its default.
"""

from __future__ import annotations

import os

EXPERIMENTS = "-event_engine_client,-event_engine_listener"

if "GRPC_EXPERIMENTS" not in os.environ:
    os.environ["GRPC_EXPERIMENTS"] = EXPERIMENTS

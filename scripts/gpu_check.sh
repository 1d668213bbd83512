#!/usr/bin/env bash
# GPU check: the CUDA tests, then scripts/bench_scale.py on the GPU, in one command, at most 9 minutes (pytest <= 1.7,
# SmolLM2 <= 2.5 where installed, bench_scale <= 6.5) on an H200; results (logs, JSON) go to $OUT (default ./gpu-check-out).
#
#   bash scripts/gpu_check.sh                      # from the repository root, with .venv set up
#   PY=python3 bash scripts/gpu_check.sh           # a lent GPU machine, after installing .whl/ (device-kit)
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh  # no GPU: the same path on the CPU with a 2-block model
#
# 1. tests/test_devices.py (its CUDA tests; tiny random models, nothing from the hub);
# 2. SmolLM2 (all 30 blocks) on the GPU vs fp32 on the CPU, for none / int8 / int4 (/ nf4): only where the
#    embedded model is installed (it does not travel to a lent machine: 98 MB);
# 3. scripts/bench_scale.py --device cuda: a Llama-3.2-3B-shaped random checkpoint (bf16 shards, built there,
#    nothing downloaded), transformers in one process vs 4 nodes under --max-memory choosing their spans, for
#    --quant none, int4, int8 (in that order: each swarm reports as it finishes) and nf4 where bitsandbytes is
#    installed.
# On a machine without a CUDA GPU (and without GPU_CHECK_DRY_RUN) it says so and exits 0.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PY:-$REPO/.venv/bin/python}"
command -v "$PY" >/dev/null || { echo "gpu_check: no python at $PY (set PY=python3 on a lent machine)" >&2; exit 1; }
OUT="${OUT:-$REPO/gpu-check-out}"
mkdir -p "$OUT"
DEVICE=cuda
EXTRA=()
if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then
    DEVICE=cpu
    EXTRA=(--dry-run --quants none,int4)
    echo "gpu_check: dry run on the CPU (GPU_CHECK_DRY_RUN)"
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False): nothing to check here."
    exit 0
else
    "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")' | tee "$OUT/gpu.txt"
    QUANTS=none,int4,int8
    "$PY" -c 'import bitsandbytes' 2>/dev/null && QUANTS="$QUANTS,nf4" || echo "gpu_check: nf4 left out: bitsandbytes is not installed" | tee -a "$OUT/gpu.txt"
    EXTRA=(--quants "$QUANTS" --tokens 32 --prompt-tokens 128)
fi
# Run from a folder outside the checkout: its torchnode/ folder (the CLI alone) must not shadow the installed
# package for `python -m torchnode` and pytest.
WORK="$(mktemp -d)"
cd "$WORK"

echo "== CUDA tests" | tee -a "$OUT/gpu.txt"
# -rfEs: every failure's and skip's name and reason in the summary, which the tail keeps
timeout 100 "$PY" -m pytest -q -rfEs --tb=line -p no:cacheprovider "$REPO/tests/test_devices.py" 2>&1 | tail -40 | tee -a "$OUT/gpu.txt"

if [ "$DEVICE" = cuda ] && "$PY" -c 'from torchnode.models.checkpoint import resolve; resolve("default")' 2>/dev/null; then
    echo "== SmolLM2 on the GPU" | tee -a "$OUT/gpu.txt"
    timeout 150 "$PY" - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt"
import time, torch
from torchnode.models.checkpoint import resolve
from torchnode.models.devices import default_dtype, place, resolve_device, synchronize
from torchnode.models.families import load_head, load_span
from torchnode.models.quantization import weight_bytes

ckpt = resolve("default")
total = ckpt.hf_config.num_hidden_layers
cuda = resolve_device("cuda")
dtype = default_dtype(cuda)
head = load_head(ckpt)
ids = torch.arange(1, 201)[None] * 37 % 40000  # a fixed 200-token text of ids
reference = load_span(ckpt, 0, total)
expected = head.logits(reference(head.embed(ids), 0, 0, total))[0].argmax(-1)
modes = ["none", "int8", "int4"]
try:
    import bitsandbytes  # noqa: F401
    modes.append("nf4")
except ImportError:
    print("nf4 skipped: bitsandbytes is not installed")
print(f"| quant | dtype | weights MiB | decode tok/s | agreement with fp32 CPU |")
for quant in modes:
    span = place(load_span(ckpt, 0, total, dtype, quant, cuda), cuda)
    got = head.logits(span(head.embed(ids), 0, 0, total))[0].argmax(-1)
    caches = span.new_caches(0, total, 1, 80)
    x = head.embed(ids[:, :1])
    span(x, 0, 0, total, caches)
    synchronize(cuda)
    started = time.perf_counter()
    for i in range(1, 65):
        span(x, i, 0, total, caches)  # outputs come back to the CPU, which waits for the GPU
    speed = 64 / (time.perf_counter() - started)
    agree = (got == expected).float().mean().item()
    print(f"| {quant} | {str(dtype).removeprefix('torch.')} | {weight_bytes(span.module) / 2**20:.0f} | {speed:.1f} | {agree:.1%} |")
EOF
else
    echo "== SmolLM2 skipped: the embedded model is not installed here (or no GPU)" | tee -a "$OUT/gpu.txt"
fi

echo "== bench_scale on $DEVICE" | tee -a "$OUT/gpu.txt"
PYTHONUNBUFFERED=1 timeout 390 "$PY" "$REPO/scripts/bench_scale.py" --device "$DEVICE" --shape llama-3.2-3b \
    --cache-dir "$WORK" --settle 3 --json "$OUT/scale.json" "${EXTRA[@]}" 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/scale.txt"
echo "gpu_check: done (results in $OUT)"

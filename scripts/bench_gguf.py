"""Memory of the GGUF path: converting the embedded SmolLM2 Q4_1 GGUF, and loading an int4 span from it.

Each figure comes from a fresh process and is the rise of its peak resident memory (VmHWM, reset after
the imports) over what it held before:
- conversion: `gguf_to_safetensors` into an empty cache (the floats, tensor by tensor, then the raw Q4
  blocks), against the largest dequantized tensor (the embedding);
- int4 span: `load_span(..., quant="int4")` of all blocks, served from the GGUF's own codes, against the
  same span re-quantized from the floats (the side file hidden), and against its weights.

    .venv/bin/python scripts/bench_gguf.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 1 << 20

CHILD = """
import json, sys
from pathlib import Path
from torchnode.models.checkpoint import Checkpoint, default_gguf
from torchnode.models.families import load_span, num_blocks
from torchnode.models.gguf_convert import gguf_to_safetensors
from torchnode.models.quantization import weight_bytes
from torchnode.models.safetensors_files import safetensors_header

def status(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024

what = sys.argv[1]
if what == "span":
    ckpt = Checkpoint(name="default", path=Path(sys.argv[2]))
    ckpt.hf_config
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak RSS, to the RSS now
before = status("VmRSS")
if what == "convert":
    path = gguf_to_safetensors(default_gguf())
    header, _ = safetensors_header(path / "model.safetensors")
    largest = max(end - begin for begin, end in (e["data_offsets"] for e in header.values()))
    out = {"largest": largest, "path": str(path)}
else:
    out = {"weights": weight_bytes(load_span(ckpt, 0, num_blocks(ckpt), quant="int4"))}
print(json.dumps({"rise": status("VmHWM") - before, **out}))
"""


def child(cache: Path, *args: str) -> dict:
    env = {**os.environ, "TORCHNODE_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from torchnode.models.gguf_q4 import GGUF_Q4_BLOCKS

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        convert = child(cache, "convert")
        print(
            f"conversion into an empty cache: peak +{convert['rise'] / MiB:.0f} MiB "
            f"(largest tensor {convert['largest'] / MiB:.0f} MiB)"
        )
        converted = Path(convert["path"])
        codes = child(cache, "span", str(converted))
        print(
            f"int4 span of all blocks from the GGUF's codes: peak +{codes['rise'] / MiB:.0f} MiB "
            f"for {codes['weights'] / MiB:.0f} MiB of weights"
        )
        floats_only = cache / "floats-only"  # the same checkpoint without its Q4 blocks: re-quantized
        floats_only.mkdir()
        side = GGUF_Q4_BLOCKS.split("/")[0]
        for item in converted.iterdir():
            if item.name != side:
                (floats_only / item.name).symlink_to(item)
        requantized = child(cache, "span", str(floats_only))
        print(
            f"int4 span of all blocks re-quantized from the floats: peak +{requantized['rise'] / MiB:.0f} MiB "
            f"for {requantized['weights'] / MiB:.0f} MiB of weights"
        )


if __name__ == "__main__":
    main()
